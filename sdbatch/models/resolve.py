"""Model resolution, torch-free: a model name to a checked, pinned ``ModelRef``.

A model is ``builtin:NAME`` (a diffusers folder shipped in ``sdbatch/models/NAME/``), a local
diffusers folder, or an ``s3://`` prefix holding one. Everything here runs without torch, so
``submit`` can refuse a model before any worker starts:

- **one pickle policy** (``pins``), the same for local folders and ``s3://`` prefixes: a model holding any
  pickle checkpoint (``*.bin``, ``*.ckpt``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``) is
  refused, even next to safetensors — sdbatch loads safetensors only and never ships a folder
  whose other files a loader could be tricked into unpickling;
- **one code policy** (``pins``): sdbatch runs only stock diffusers/transformers classes; a folder whose
  ``model_index.json`` names a component from a module of its own, that holds ``*.py`` files,
  or whose configs carry an ``auto_map`` is refused at submit, naming it;
- **the family**, from ``model_index.json`` ``_class_name`` (``families.FAMILIES``): a pipeline
  class sdbatch does not run exits 2, naming the class found and the supported ones
  (``builtin.NULL_CLASS_NAME``: ``builtin:null``'s folder names a model that is not a diffusers
  pipeline, ``families/null.py``); a ``model.refiner`` must be the class its base's family takes.
  ``model_index.json`` and the configs are read once (``JsonReader``), and the same read gives
  the family and native size (``ModelRef.traits``);
- **single-file checkpoints**: a local ``.safetensors`` file as AUTOMATIC1111/ComfyUI/Civitai
  keep them (``model.name``) with the diffusers folder of its architecture (``model.config``,
  itself resolved as a model: its configs give the family and traits, and it supplies what the
  file lacks); the file must be safetensors (its header is read) or a GGUF-quantized
  transformer (``.gguf``, read by the ``gguf`` package; loaded with diffusers'
  ``GGUFQuantizationConfig``), and the pin covers the file's bytes and the folder's pin
  (``pins.single_file_pin``);
- **a VAE override** (``model.vae``): a local diffusers VAE folder (``config.json`` and
  safetensors, as ``AutoencoderKL.save_pretrained`` writes it) of the class the model's own
  ``vae`` component is, under the same pickle and code policies; the model's pin then covers
  the VAE folder's content too (``pins.vae_pin``), so the fingerprint, ``job.json`` and each
  image's model hash name the pair;
- **textual-inversion embeddings** (``embeddings``): local safetensors files, for a family that
  takes them (``FamilyAdapter.takes_embeddings``: SD 1.x/2.x, SDXL); the model's pin covers each
  one's name and sha256 (``pins.embeddings_pin``);
- **ControlNets** (``controlnets``): local diffusers ControlNet folders, for a family that runs
  them (``FamilyAdapter.controlnet``: SD 1.x/2.x, SDXL, FLUX.1, SD3), of its ``controlnet_model``
  class, under the same pickle and code policies; one whose config does not fit the model's
  denoiser (``FamilyAdapter.controlnet_fit``: latent channels, block or attention widths, text
  embedding widths, SDXL's added embeddings) is refused naming the
  folder, the model and the keys; the model's pin covers each one's name and content
  (``pins.controlnets_pin``);
- **an IP-Adapter** (``ip_adapter``): a local safetensors file and its image encoder (a local
  ``CLIPVisionModelWithProjection`` folder, under the same pickle and code policies), for a
  family that takes one (``FamilyAdapter.ip_adapter``: SD 1.x/2.x, SDXL); one whose tensors do not
  fit the model's UNet or the encoder (``lora_keys.ip_adapter_misfits``) is refused naming the
  file and the model; the model's pin covers the file's sha256 and the encoder's content
  (``pins.ip_adapter_pin``);
- **pre-quantized folders**: the components saved with a ``quantization_config``
  (``ModelRef.quantized``), which ``job.preflight`` and the runtime check the workers can load
  (``quantized.check_loadable``);
- **the pin**, recorded in ``job.json`` at submit and compared with every worker's before it
  gets a shard: a local folder's content fingerprint (sha256 over every file of every component
  folder, read through symbolic links as the loader reads them), an ``s3://`` prefix's ETags
  and sizes (``s3-etags:<sha256>``), which also key the
  per-node download cache (``cache``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdbatch.models.builtin import local_model_dir
from sdbatch.models.configs import JsonReader, folder_json_reader, storage_json_reader
from sdbatch.models.errors import ModelError
from sdbatch.models.lora_keys import ModelModules, describe_misfits, file_shapes, ip_adapter_misfits
from sdbatch.models.pins import (
    checkpoint_tensor_names,
    controlnets_pin,
    embeddings_pin,
    file_sha256,
    fingerprint_model_dir,
    ip_adapter_pin,
    model_file_names,
    refuse_custom_code,
    refuse_pickles,
    s3_pin,
    single_file_pin,
    vae_pin,
)
from sdbatch.models.quantized import Quantization, read_quantizations
from sdbatch.storage.locations import is_s3

if TYPE_CHECKING:
    from sdbatch.models.families import FamilyAdapter, ModelTraits


def _check_folder(where: str, folder: Path, read: JsonReader) -> None:
    """The pickle and code policies on a local model folder."""
    names = model_file_names(folder)
    refuse_pickles(where, names)
    refuse_custom_code(where, names, read)


@dataclass(frozen=True)
class ModelRef:
    """A model checked by the pickle policy and its family rule: where it is, what it is pinned
    to, its family and native size (``families.ModelTraits``; None for a refiner), and, once
    resolved on a worker, the local folder it is loaded from."""

    name: str
    pin: str
    traits: ModelTraits | None
    folder: Path | None = None
    checkpoint: Path | None = None  # a single-file checkpoint, loaded with ``folder``'s configuration
    vae: Path | None = None  # model.vae: the VAE folder loaded in place of the model's own
    embeddings: tuple[tuple[str, Path], ...] = ()  # textual-inversion embeddings: (name, file)
    controlnets: tuple[tuple[str, Path, str], ...] = ()  # ControlNets: (name, folder, content fingerprint)
    ip_adapter: tuple[Path, Path] | None = None  # the IP-Adapter: (weights file, image encoder folder)
    quantized: tuple[Quantization, ...] = ()  # components saved quantized (bitsandbytes, torchao)


def _check_configs(where: str, read: JsonReader, refiner_of: FamilyAdapter | None) -> ModelTraits | None:
    """The family rule on the configs ``read`` reads: a model's traits, or (``refiner_of``: the
    base's family) the refiner's class check."""
    from sdbatch.models.families import check_refiner, read_traits

    if refiner_of is not None:
        check_refiner(read, where, refiner_of)
        return None
    return read_traits(read, where)


def _single_file(name: str, config: ModelRef) -> ModelRef:
    """The single-file checkpoint ``name`` with the configuration of the resolved ``config``."""
    checkpoint = Path(name).expanduser()
    if not is_s3(name) and not checkpoint.exists():
        raise ModelError(f"model {name!r}: no such file (relative paths are read from {Path.cwd()}); check the path to "
                         "the .safetensors checkpoint")
    if is_s3(name) or not checkpoint.is_file():
        raise ModelError(f"model {name!r}: a single-file checkpoint must be a local .safetensors or .gguf file (copy it to each "
                         "node, or save the pipeline as a diffusers folder, which may live on s3://)")
    checkpoint_tensor_names(checkpoint, repr(name))
    return ModelRef(name, single_file_pin(checkpoint, config.pin), config.traits, config.folder, checkpoint.resolve(),
                    quantized=config.quantized)


def _component_folder(where: str, folder: Path, missing: str) -> tuple[list[str], JsonReader]:
    """A local folder of one component (a VAE, a ControlNet) under the pickle and code policies:
    its file names and a reader of its configs; ModelError saying ``missing`` without a config.json."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{where}: no config.json there; {missing}")
    names = model_file_names(folder)
    refuse_pickles(where, names)
    read = folder_json_reader(folder)
    refuse_custom_code(where, names, read)
    return names, read


def _with_vae(ref: ModelRef, vae: str | None, read: JsonReader) -> ModelRef:
    """``ref`` with the VAE folder ``vae`` in place of its own VAE (``read``: the model's
    configs): the class its ``vae`` component is, the pickle and code policies, pinned together."""
    if vae is None:
        return ref
    where = f"model.vae {vae!r}"
    folder = Path(vae).expanduser()
    names, vae_read = _component_folder(where, folder, "model.vae must be a local diffusers VAE folder (config.json "
                                        "and diffusion_pytorch_model.safetensors, as AutoencoderKL.save_pretrained writes "
                                        "it). A single .safetensors VAE: load it with AutoencoderKL.from_single_file and "
                                        "save_pretrained it")
    own = (read("model_index.json") or {}).get("vae") or [None, None]
    found = (vae_read("config.json") or {}).get("_class_name")
    if own[1] is None or found != own[1]:
        takes = f"a {own[1]} folder" if own[1] else "none: the model has no vae component"
        raise ModelError(f"{where}: config.json names class {found!r}; model {ref.name!r} takes {takes}. Point "
                         "model.vae at a VAE of the model's architecture (e.g. a fine-tuned SD/SDXL VAE), or remove it")
    if not any(n.endswith(".safetensors") for n in names):
        raise ModelError(f"{where}: no .safetensors weights there; save the VAE with save_pretrained(safe_serialization=True)")
    return replace(ref, pin=vae_pin(ref.pin, fingerprint_model_dir(folder)), vae=folder.resolve())


def _family_taking(ref: ModelRef, key: str, what: str, takes: Callable[[FamilyAdapter], object]) -> FamilyAdapter:
    """The family of ``ref`` (a base model's), or ModelError when it takes no ``what`` (the
    spec's ``key``), naming the families that do."""
    from sdbatch.models.families import FAMILIES

    assert ref.traits is not None  # a base model's ref
    family = ref.traits.family
    if not takes(family):
        names = ", ".join(f.name for f in FAMILIES.values() if takes(f))
        raise ModelError(f"{key}: model {ref.name!r} is a {family.name} model, which takes no {what} (only {names} "
                         f"models do); remove {key}")
    return family


def _with_embeddings(ref: ModelRef, embeddings: dict[str, str] | None) -> ModelRef:
    """``ref`` with the textual-inversion embedding files ``embeddings`` (name → local
    .safetensors), checked and pinned with it."""
    if not embeddings:
        return ref
    _family_taking(ref, "embeddings", "textual-inversion embeddings (they load into CLIP text encoders)",
                   lambda family: family.takes_embeddings)
    sha256 = {}
    for name, path in sorted(embeddings.items()):
        where = f"embedding {name!r} ({path})"
        if not Path(path).is_file():
            raise ModelError(f"embeddings: {where}: no such file; check the path (it must be readable on every node)")
        checkpoint_tensor_names(Path(path), where)
        sha256[name] = file_sha256(Path(path))
    return replace(ref, pin=embeddings_pin(ref.pin, sha256),
                   embeddings=tuple((name, Path(path)) for name, path in sorted(embeddings.items())))


def _with_controlnets(ref: ModelRef, controlnets: dict[str, str] | None, read: JsonReader) -> ModelRef:
    """``ref`` with the ControlNet folders ``controlnets`` (name → local folder; ``read``: the
    model's configs), each checked to fit the model's denoiser and pinned with it."""
    if not controlnets:
        return ref
    family = _family_taking(ref, "controlnets", "ControlNets in sdbatch", lambda family: family.controlnet)
    denoiser = read(f"{family.denoiser}/config.json") or {}
    found = []
    for name, path in sorted(controlnets.items()):
        where = f"controlnets: controlnet {name!r} ({path})"
        folder = Path(path)
        names, config_read = _component_folder(where, folder, "a ControlNet is a local diffusers folder (config.json and "
                                               f"diffusion_pytorch_model.safetensors, as {family.controlnet_model}"
                                               ".save_pretrained writes it)")
        config = config_read("config.json") or {}
        if config.get("_class_name") != family.controlnet_model:
            raise ModelError(f"{where}: config.json names class {config.get('_class_name')!r}, not "
                             f"{family.controlnet_model} ({family.name}'s ControlNet class); point it at a diffusers "
                             f"ControlNet folder made for {family.name}")
        if config.get("num_mode"):  # diffusers runs a union ControlNet only with a control_mode, which no column names
            raise ModelError(f"{where} is a union ControlNet ({config['num_mode']} modes), which needs a control "
                             "mode sdbatch does not pass yet; use a single-mode ControlNet")
        misfits = [f"{key} {config.get(key)!r} (the model's {family.denoiser}: {denoiser.get(key)!r})"
                   for key in family.controlnet_fit if config.get(key) != denoiser.get(key)]
        if misfits:
            raise ModelError(f"{where} does not fit model {ref.name!r}: {'; '.join(misfits)}. A ControlNet "
                             f"is trained for one base architecture: use one made for this {family.name} model")
        if not any(n.endswith(".safetensors") for n in names):
            raise ModelError(f"{where}: no .safetensors weights there; save it with "
                             "save_pretrained(safe_serialization=True)")
        found.append((name, folder.resolve(), fingerprint_model_dir(folder)))
    return replace(ref, pin=controlnets_pin(ref.pin, {name: fp for name, _, fp in found}), controlnets=tuple(found))


def _with_ip_adapter(ref: ModelRef, ip_adapter: tuple[str, str] | None, modules: ModelModules | None) -> ModelRef:
    """``ref`` with the IP-Adapter ``ip_adapter`` (weights file, image encoder folder), checked to
    fit the model's UNet (``modules``: its weights' shapes, None when they cannot be read here)
    and pinned with it."""
    if ip_adapter is None:
        return ref
    _family_taking(ref, "ip_adapter", "IP-Adapter in sdbatch", lambda family: family.ip_adapter)
    weights, encoder = Path(ip_adapter[0]), Path(ip_adapter[1])
    where = f"ip_adapter: {weights}"
    if not weights.is_file():
        raise ModelError(f"{where}: no such file; check the path (it must be readable on every node)")
    checkpoint_tensor_names(weights, where)
    names, read = _component_folder(f"ip_adapter.image_encoder {str(encoder)!r}", encoder,
                                    "the image encoder is a local transformers folder (config.json and model.safetensors, "
                                    "as CLIPVisionModelWithProjection.save_pretrained writes it)")
    config = read("config.json") or {}
    if config.get("architectures") != ["CLIPVisionModelWithProjection"] or not any(n.endswith(".safetensors") for n in names):
        raise ModelError(f"ip_adapter.image_encoder {str(encoder)!r}: not a CLIPVisionModelWithProjection saved with "
                         f"safetensors (config.json names {config.get('architectures')!r}); point it at the image encoder "
                         "the IP-Adapter was trained with (e.g. h94/IP-Adapter's models/image_encoder)")
    misfits = ip_adapter_misfits(file_shapes(weights), modules, config.get("projection_dim"))
    if misfits:
        raise ModelError(f"{where} does not fit model {ref.name!r}: {describe_misfits(misfits)}. An IP-Adapter is trained "
                         "for one base architecture and image encoder: use one made for this model (an SD 1.5 "
                         "IP-Adapter fits SD 1.x models, an SDXL one SDXL), or remove ip_adapter")
    return replace(ref, pin=ip_adapter_pin(ref.pin, file_sha256(weights), fingerprint_model_dir(encoder)),
                   ip_adapter=(weights.resolve(), encoder.resolve()))


def _local_modules(ref: ModelRef, name: str, config: str | None) -> ModelModules | None:
    """The weight shapes of the model's own local folder (None for an ``s3://`` model or a
    single-file checkpoint, whose are not read here)."""
    if config is not None or is_s3(name):
        return None
    return ModelModules(ref.folder or local_model_dir(name))


def _configs(ref: ModelRef, name: str, config: str | None, endpoint_url: str | None) -> JsonReader:
    """A reader of the configs of the model ``ref`` resolved (its folder, or the single file's
    configuration folder), read once more for the VAE check; local or s3://."""
    where = config or name
    if ref.folder is not None:
        return folder_json_reader(ref.folder)
    if not is_s3(where):
        return folder_json_reader(local_model_dir(where))
    from sdbatch.storage.open import open_storage

    return storage_json_reader(open_storage(where, endpoint_url=endpoint_url), where)


def preflight(name: str, *, endpoint_url: str | None = None, refiner_of: FamilyAdapter | None = None,
              config: str | None = None, vae: str | None = None, embeddings: dict[str, str] | None = None,
              controlnets: dict[str, str] | None = None, ip_adapter: tuple[str, str] | None = None) -> ModelRef:
    """The model pinned and checked (``_preflight``), with its VAE override ``vae``, its
    textual-inversion ``embeddings``, its ``controlnets`` and its ``ip_adapter`` if any."""
    ref = _preflight(name, endpoint_url=endpoint_url, refiner_of=refiner_of, config=config)
    return _with_extras(ref, name, config, endpoint_url, vae, embeddings, controlnets, ip_adapter)


def _with_extras(ref: ModelRef, name: str, config: str | None, endpoint_url: str | None, vae: str | None,
                 embeddings: dict[str, str] | None, controlnets: dict[str, str] | None,
                 ip_adapter: tuple[str, str] | None = None) -> ModelRef:
    """``ref`` with what the job loads beside it: a VAE override, embeddings, ControlNets, an IP-Adapter."""
    ref = _with_vae(ref, vae, _configs(ref, name, config, endpoint_url)) if vae else ref
    ref = _with_embeddings(ref, embeddings)
    ref = _with_controlnets(ref, controlnets, _configs(ref, name, config, endpoint_url)) if controlnets else ref
    return _with_ip_adapter(ref, ip_adapter, _local_modules(ref, name, config)) if ip_adapter else ref


def _preflight(name: str, *, endpoint_url: str | None = None, refiner_of: FamilyAdapter | None = None,
               config: str | None = None) -> ModelRef:
    """Check the model (or, ``refiner_of`` given, the refiner of a base of that family) before
    any worker starts — pickles, family — and pin it; model_index.json and the configs are read
    once. ``config``: ``name`` is a single-file checkpoint and this the folder of its
    configuration. ModelError or FamilyError, or a StorageError for an s3:// prefix that cannot
    be read."""
    if config is not None:
        try:
            configured = preflight(config, endpoint_url=endpoint_url)
        except ModelError as exc:  # a Hub id, a missing folder: said of model.config, not of the checkpoint
            raise ModelError(f"model.config (--model-config) of {name!r}: {exc}") from None
        return _single_file(name, configured)
    if not is_s3(name):
        folder = local_model_dir(name)
        read = folder_json_reader(folder)
        _check_folder(name, folder, read)
        return ModelRef(name, fingerprint_model_dir(folder), _check_configs(name, read, refiner_of),
                        quantized=read_quantizations(read))
    from sdbatch.storage.open import open_storage
    from sdbatch.storage.s3 import S3Storage

    storage = open_storage(name, endpoint_url=endpoint_url)
    assert isinstance(storage, S3Storage)  # an s3:// name
    objects = storage.objects("")
    if "model_index.json" not in objects:
        raise ModelError(f"model {name!r}: no model_index.json under that prefix; it must hold a diffusers folder")
    refuse_pickles(name, objects)
    read = storage_json_reader(storage, name)
    refuse_custom_code(name, objects, read)
    return ModelRef(name, s3_pin(objects), _check_configs(name, read, refiner_of), quantized=read_quantizations(read))


def resolve(name: str, *, pin: str | None = None, endpoint_url: str | None = None,
            refiner_of: FamilyAdapter | None = None, config: str | None = None, vae: str | None = None,
            embeddings: dict[str, str] | None = None, controlnets: dict[str, str] | None = None,
            ip_adapter: tuple[str, str] | None = None) -> ModelRef:
    """The model's local folder and pin (``_resolve``), with its VAE override ``vae``, its
    textual-inversion ``embeddings``, its ``controlnets`` and its ``ip_adapter`` if any."""
    # with any, the job's pin is not the one an s3:// model's download cache is keyed by
    ref = _resolve(name, pin=None if vae or embeddings or controlnets or ip_adapter else pin, endpoint_url=endpoint_url,
                   refiner_of=refiner_of, config=config)
    return _with_extras(ref, name, config, endpoint_url, vae, embeddings, controlnets, ip_adapter)


def _resolve(name: str, *, pin: str | None = None, endpoint_url: str | None = None,
             refiner_of: FamilyAdapter | None = None, config: str | None = None) -> ModelRef:
    """The local folder to load ``name`` from (an s3:// prefix is downloaded once per node,
    into a cache keyed by its pin) and the pin of what that folder holds, checked by the same
    policy as at preflight; ``config``: as for ``preflight``."""
    if config is not None:
        return _single_file(name, resolve(config, endpoint_url=endpoint_url))
    if is_s3(name):
        from sdbatch.models.cache import fetch_model_dir

        folder, found = fetch_model_dir(name, pin=pin, endpoint_url=endpoint_url)
    else:
        folder = local_model_dir(name)
        found = fingerprint_model_dir(folder)
    read = folder_json_reader(folder)
    _check_folder(name, folder, read)
    return ModelRef(name, found, _check_configs(name, read, refiner_of), folder, quantized=read_quantizations(read))
