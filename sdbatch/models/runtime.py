"""Model loading and batch generation: the only module that imports torch and diffusers.

``load_model`` accepts ``builtin:NAME``, a local diffusers folder or an ``s3://`` prefix
holding one (resolved, pinned and checked by ``sdbatch.models``), finds its family adapter
(``families.FAMILIES``) and hands it to the loader of the family's runtime (``RUNTIMES``).
``DiffusersModel`` loads the family's text-to-image pipeline
through ``from_pretrained`` (safetensors only); its img2img pipeline is made with ``from_pipe``,
sharing every module (no second copy of the weights), and so is its inpainting pipeline (rows
with ``mask_image``); a row with ``hires_scale`` gets the hires-fix pass (``models.hires``) on
its latents. With ``model.refiner`` (SDXL) the refiner
pipeline is loaded given the base's ``text_encoder_2`` and VAE, and a row with ``refiner_switch``
runs ensemble-of-experts style: the base to ``denoising_end=switch`` as latents, the refiner from
``denoising_start=switch``, with the same per-row generators.
What differs between families (pipeline arguments, guidance, clip skip, size conditioning,
img2img extras, latent decoding, attention) comes from the adapter's declarations and hooks.
``DiffusersModel.generate`` runs one canonical batch: rows that share size, steps, sampler,
guidance, mode and adapter set (design.md §4.2, §4.3). Each row gets its own CPU ``torch.Generator``
seeded with the row's seed, used for its initial noise and for any per-step noise of
ancestral samplers, so a row's image does not depend on which other rows share its batch.
LoRA adapters are loaded once each (``LoraCache``) and switched per batch with
``set_adapters``, never fused, so a scale of 0 renders exactly as no adapter.

The latents are decoded to uint8 pixels on the model's device and copied to the host once per
batch (no PIL on the generation thread). A row whose latents or pixels hold NaN/inf, or whose
image is all black (the fp16 VAE overflow of SD models), is decoded again with the VAE in
float32; if it is still bad it comes back with an error instead of an image. On CUDA the
UNet runs channels_last with PyTorch SDPA attention, optionally ``torch.compile``d. The job's
speed profile (``models.speed``) is applied after loading (``speed_runtime.apply_speed``) and
recorded in each row's facts; each distinct prompt is encoded once per worker (``PromptCache``).
A CLIP-encoder family reads AUTOMATIC1111 emphasis, BREAK and long prompts through compel
(``PromptReader``, unless ``model.prompt_syntax`` is literal); a canonical batch then runs in
groups of equal chunk count, so no row's conditioning is padded by a batch-mate's length.
For models larger than the GPU: ``model.offload`` (diffusers' offloading hooks),
``model.text_encoder_device`` (the text encoders kept on the CPU, ``models.text_encoders``) and
pre-quantized folders, checked loadable on this worker and recorded with their method, bits and
backend version (``models.quantized``).
``builtin:null`` (``families/null.py``) loads through ``load_model`` too, and without torch
through ``models.loading`` (``reproduce`` of a ``builtin:null`` job imports no torch).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Library chatter (progress bars, safety-checker and torchvision notices) would bury our
# own log lines in every worker; this must be set before diffusers/transformers import.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# torchao (the quantized extra), imported by diffusers, warns of each CUDA-only kernel it cannot load on a CPU
logging.getLogger("torchao").setLevel(logging.ERROR)

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from diffusers.pipelines.pipeline_utils import DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from sdbatch.data.controlnets import parse_column as parse_controlnets  # noqa: E402
from sdbatch.data.loras import embedding_tokens  # noqa: E402
from sdbatch.data.record import NO_CONDITIONING, ConditioningInputs, GenerationFacts  # noqa: E402
from sdbatch.data.row import Row  # noqa: E402
from sdbatch.data.samplers import DEFAULT_SAMPLER, SAMPLERS  # noqa: E402
from sdbatch.models.adapter import GeneratedBatch, LoadedModel, LoadRequest, ModelInfo  # noqa: E402
from sdbatch.models.configs import folder_json_reader  # noqa: E402
from sdbatch.models.device import pick_device, pick_dtype, software_versions  # noqa: E402
from sdbatch.models.errors import GGUF_SUFFIX, ModelError  # noqa: E402
from sdbatch.models.families import ModelTraits  # noqa: E402
from sdbatch.models.families.base import DiffusersFamily  # noqa: E402
from sdbatch.models.hires import hires_pass  # noqa: E402
from sdbatch.models.ip_adapter import IPAdapterSwitch, image_encoder_components  # noqa: E402
from sdbatch.models.loading import load_request, load_torch_free  # noqa: E402
from sdbatch.models.lora_cache import LoraCache, Tokenizers  # noqa: E402
from sdbatch.models.pins import fingerprint_model_dir  # noqa: E402
from sdbatch.models.prompt_cache import PromptCache  # noqa: E402
from sdbatch.models.prompt_weights import PromptReader  # noqa: E402
from sdbatch.models.quantized import check_loadable, read_quantizations  # noqa: E402
from sdbatch.models.quantized import describe as describe_quantization  # noqa: E402
from sdbatch.models.quantized import recorded as recorded_quantization  # noqa: E402
from sdbatch.models.qwen_processor import ImageQwen2VLProcessor  # noqa: E402
from sdbatch.models.resolve import resolve  # noqa: E402
from sdbatch.models.speed import AppliedSpeed, SpeedSpec  # noqa: E402
from sdbatch.models.speed_runtime import apply_speed  # noqa: E402
from sdbatch.models.text_encoders import encode_on, place  # noqa: E402
from sdbatch.storage.locations import is_s3  # noqa: E402

log = logging.getLogger("sdbatch.generate")
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


# what a worker catches to retry a batch in halves (the tests inject it on CPU)
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


def device_capacity() -> int | None:
    """The CUDA device's memory in bytes (None on CPU: batches are not sized by memory there)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None


def free_device_memory() -> None:
    """Give the allocator's cached blocks back after an out-of-memory error (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resize_for_row(image: Image.Image, width: int, height: int) -> Image.Image:
    """The documented init-image rule: scale to cover width×height keeping the aspect ratio
    (Lanczos), then centre-crop to exactly width×height; RGB."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _load_pipeline(class_name: str, model: str, folder: Path, dtype: torch.dtype, components: dict[str, Any],
                   device: str) -> DiffusionPipeline:
    """``from_pretrained`` of a diffusers folder (safetensors only, no network) on ``device``;
    ``components`` are passed in (shared modules, or None for those sdbatch never runs)."""
    pipeline_cls = getattr(diffusers, class_name)
    try:
        pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                            **{**_absent_components(pipeline_cls, folder), **components})
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r} could not be loaded from {folder}: {exc}") from exc
    return pipe.to(device)


#: tensor-name prefixes of a single-file checkpoint that holds text encoders too (a whole SD 1.x /
#: 2.x, SDXL or SD3 pipeline as AUTOMATIC1111 keeps it), not a denoiser alone (a FLUX transformer)
_PIPELINE_CHECKPOINT = ("cond_stage_model.", "conditioner.", "text_encoders.")


def _load_single_file(family: DiffusersFamily, model: str, checkpoint: Path, folder: Path, dtype: torch.dtype,
                      components: dict[str, Any], device: str) -> DiffusionPipeline:
    """A single-file checkpoint through diffusers' ``from_single_file``, with the configuration
    of ``folder`` (no network): a whole pipeline, or the family's denoiser alone, the rest
    loaded from ``folder``."""
    from sdbatch.models.pins import checkpoint_tensor_names

    names = checkpoint_tensor_names(checkpoint, repr(model))
    gguf = checkpoint.suffix.lower() == GGUF_SUFFIX  # a quantized transformer, dequantized per layer as it runs
    quantized = {"quantization_config": diffusers.GGUFQuantizationConfig(compute_dtype=dtype)} if gguf else {}
    try:
        if not gguf and any(n.startswith(_PIPELINE_CHECKPOINT) for n in names):
            pipe = getattr(diffusers, family.txt2img).from_single_file(
                str(checkpoint), config=str(folder), torch_dtype=dtype, local_files_only=True, **components)
            return pipe.to(device)
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        denoiser_cls = getattr(diffusers, index[family.denoiser][1])
        denoiser = denoiser_cls.from_single_file(str(checkpoint), config=str(folder), subfolder=family.denoiser,
                                                 torch_dtype=dtype, local_files_only=True, **quantized)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: a converter's tensor of another shape
        # the fix before diffusers' words: a worker's start error is shown cut short (run.cluster.short_error)
        raise ModelError(f"model {model!r}: the single-file checkpoint does not load with model.config {folder.name!r}'s "
                         f"configuration (is model.config a folder of the same architecture?): "
                         f"{type(exc).__name__}: {exc}") from exc
    return _load_pipeline(family.txt2img, model, folder, dtype, {**components, family.denoiser: denoiser}, device)


def _img2img_pipeline(class_name: str, txt2img: DiffusionPipeline) -> DiffusionPipeline:
    """The img2img pipeline over the same modules as ``txt2img`` (``from_pipe``). from_pipe casts
    every module to one dtype, which a quantized one (a GGUF transformer) refuses: then the
    modules are passed as they are."""
    img2img = getattr(diffusers, class_name)
    if not any(getattr(module, "is_quantized", False) for module in txt2img.components.values()):
        return img2img.from_pipe(txt2img)
    expected, optional = img2img._get_signature_keys(img2img)
    return img2img(**{name: module for name, module in txt2img.components.items() if name in (*expected, *optional)})


def _vae_override(folder: Path, vae: Path | None, dtype: torch.dtype) -> dict[str, Any]:
    """``model.vae``: the VAE folder loaded as the class the model's own ``vae`` component is
    (``resolve`` checked it is), passed to the pipeline in place of its own."""
    if vae is None:
        return {}
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    try:
        return {"vae": getattr(diffusers, index["vae"][1]).from_pretrained(vae, dtype=dtype, use_safetensors=True,
                                                                          local_files_only=True)}
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.vae {str(vae)!r} could not be loaded: {exc}") from exc


#: the component classes of sdbatch's own a family's ``component_classes`` may name, with their loaders
_OWN_CLASSES: dict[str, Callable[[Path], Any]] = {"ImageQwen2VLProcessor": ImageQwen2VLProcessor.from_folder}


def _own_components(family: DiffusersFamily, model: str, folder: Path) -> dict[str, Any]:
    """The family's ``component_classes``, each loaded from its subfolder with its transformers
    class or one of sdbatch's (``_OWN_CLASSES``) (the pipeline is loaded without them, then given
    them: diffusers would check them against the class model_index.json names)."""

    def load(class_name: str, subfolder: Path) -> Any:
        if class_name in _OWN_CLASSES:
            return _OWN_CLASSES[class_name](subfolder)
        return getattr(transformers, class_name).from_pretrained(subfolder, local_files_only=True)

    try:
        return {name: load(class_name, folder / name) for name, class_name in family.component_classes.items()}
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {model!r}: its {', '.join(family.component_classes)} could not be loaded from "
                         f"{folder}: {exc}") from exc


def _load_embeddings(pipe: Any, embeddings: tuple[tuple[str, Path], ...]) -> None:
    """Textual-inversion embeddings under the token ``<NAME>``: an SD file into the text
    encoder, an SDXL one (AUTOMATIC1111's ``clip_l`` / ``clip_g`` tensors) into both."""
    from safetensors.torch import load_file

    for name, path in embeddings:
        tensors = load_file(path)
        try:
            if {"clip_l", "clip_g"} <= tensors.keys() and getattr(pipe, "text_encoder_2", None) is not None:
                for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                                ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                    pipe.load_textual_inversion(tensors[key], token=f"<{name}>", text_encoder=encoder, tokenizer=tokenizer)
            else:
                pipe.load_textual_inversion(str(path), token=f"<{name}>")
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"embedding {name!r} ({path}) does not fit the model's text encoder: {exc}") from exc


def _load_controlnets(controlnets: tuple[tuple[str, Path, str], ...], family: DiffusersFamily, dtype: torch.dtype,
                      device: str) -> dict[str, Any]:
    """The job's ControlNets (``controlnets``), each loaded once as the family's ControlNet class
    (``resolve`` checked they fit)."""
    loaded = {}
    model_class = getattr(diffusers, family.controlnet_model)
    for name, folder, _ in controlnets:
        try:
            loaded[name] = model_class.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                       local_files_only=True).to(device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"controlnet {name!r} ({folder}) could not be loaded: {exc}") from exc
    return loaded


@contextmanager
def _control_images_encoded_to_mean(vae: Any) -> Iterator[None]:
    """While a ControlNet pipeline runs, its VAE encodes control images (FLUX.1's and SD3's
    pipelines do) to the posterior's mean, not a sample: SD3's draws that sample from the global
    RNG (a row would depend on its batch and process, and not reproduce), FLUX.1's from the rows'
    generators before their noise (a scale-0 ControlNet would not render as none)."""
    encode = vae.encode

    def encode_to_mean(images: torch.Tensor, return_dict: bool = True) -> SimpleNamespace:
        mean = encode(images).latent_dist.mode()
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: mean, mode=lambda: mean))

    vae.encode = encode_to_mean
    try:
        yield
    finally:
        del vae.encode  # the shared VAE's own method again


def _offload(pipe: DiffusionPipeline, offload: str) -> None:
    """diffusers' offloading for a model larger than the GPU (``model.offload``): each
    component moved to the GPU while it runs, or its layers streamed there in groups."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cuda")
    elif offload == "group":
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)


def _quantized(pipe: DiffusionPipeline, refiner: DiffusionPipeline | None = None) -> dict[str, str]:
    """The components a pre-quantized folder holds quantized (bitsandbytes, torchao, GGUF: what
    their configs' ``quantization_config`` says), the refiner's own ones named "refiner <name>",
    for each image's record (``versions``): the method, its bits and the backend's version."""
    found = []
    shared = [module for module in pipe.components.values() if module is not None]
    for prefix, stage in (("", pipe), ("refiner ", refiner)):
        for name, module in (stage.components.items() if stage is not None else ()):
            if stage is refiner and any(module is base for base in shared):
                continue  # the base's text encoder and VAE, which the refiner reads
            config = getattr(getattr(module, "config", None), "quantization_config", None)
            if config is None and getattr(module, "hf_quantizer", None) is not None:  # quantized at load: a .gguf file
                config = module.hf_quantizer.quantization_config
            if config is not None:
                found.append(describe_quantization(prefix + name, config if isinstance(config, dict) else config.to_dict()))
    return recorded_quantization(tuple(found))


def _absent_components(pipeline_cls: Any, folder: Path) -> dict[str, None]:
    """Components the folder leaves out or names as null (an SD3 folder without its T5
    encoder): passed as None, which the pipelines accept for them."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    return {name: None for name in expected if not (index.get(name) or [None])[0]}


class DiffusersModel:
    """One loaded model replica: the family's text-to-image pipeline and an img2img pipeline
    that shares its modules, a per-call scheduler built from the model's own scheduler config,
    and the job's LoRA adapters."""

    # a pipeline's __call__ is its own class's (DiffusionPipeline declares none): typed Any
    def __init__(self, txt2img: Any, info: ModelInfo, traits: ModelTraits,
                 loras: dict[str, str] | None = None, endpoint_url: str | None = None, compiled: bool = False,
                 refiner: Any = None, speed: AppliedSpeed | None = None, embedding_names: tuple[str, ...] = (),
                 prompt_syntax: str = "a1111", controlnets: dict[str, Any] | None = None,
                 controlnet_fingerprints: dict[str, str] | None = None, ip_adapter: IPAdapterSwitch | None = None,
                 text_encoder_device: str = "same"):
        self.txt2img = txt2img
        self.refiner = refiner
        self.compiled = compiled
        self.speed = speed or AppliedSpeed("exact", {}, {})
        self.warmup_seconds = 0.0  # spent compiling (the one-step warm-up per batch shape), reported apart
        self._warm_shapes: set[tuple] = set()
        assert isinstance(traits.family, DiffusersFamily)  # RUNTIMES["diffusers"] loads only these
        self.family = traits.family
        self.traits = traits
        # a family without img2img (FLUX.2 [klein]) has its init-image rows refused at validation
        self.img2img = _img2img_pipeline(self.family.img2img, txt2img) if self.family.img2img else None
        self.inpaint = _img2img_pipeline(self.family.inpaint, txt2img) if self.family.inpaint else None
        self.info = info
        self._embedding_names = embedding_names
        self._controlnets = controlnets or {}
        self._controlnet_fingerprints = controlnet_fingerprints or {}
        self._controlnet_pipes: dict[tuple[str, ...], Any] = {}  # by the ControlNets' names, in row order
        self.ip_adapter = ip_adapter  # in the UNet every pipeline shares; on for IP-Adapter batches only
        self.loras = LoraCache(txt2img, loras or {}, endpoint_url)
        self._tokenizers = Tokenizers(self.family.prompt_tokenizers(txt2img, traits))
        # each stage's own scheduler (class and config): samplers are built from it per batch
        self._schedulers = {stage: (type(pipe.scheduler), dict(pipe.scheduler.config))
                            for stage, pipe in (("base", txt2img), ("refiner", refiner)) if pipe is not None}
        self._sampler_configs: dict[str, dict[str, Any]] = {}
        # the rules validation ran on each row at preflight, checked again for callers that skip it
        self._row_rules = traits.rules_for_rows()
        for encoder in (getattr(txt2img, "text_encoder", None), getattr(txt2img, "text_encoder_2", None)):
            if encoder is not None and not hasattr(encoder, "text_model"):
                # diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm, which
                # transformers 5 flattened into text_encoder.final_layer_norm; point the old name at
                # the model itself (bypassing nn.Module registration, so it is no submodule)
                object.__setattr__(encoder, "text_model", encoder)
        # A1111 emphasis, BREAK and long prompts through compel, below the cache (which keeps their embeddings too)
        self.reader = PromptReader(self.family.weighted_prompts if prompt_syntax == "a1111" else None, txt2img,
                                   self._encoder_text)
        self.prompts = PromptCache()
        self._text_encoder_device = text_encoder_device
        for pipe in (self.txt2img, self.img2img, self.inpaint, refiner):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
                self._install_prompt_path(pipe)
                if ip_adapter is not None and pipe is not refiner:
                    ip_adapter.install(pipe)

    def _install_prompt_path(self, pipe: Any) -> None:
        """A pipeline's ``encode_prompt`` wrapped, innermost first: A1111 syntax through compel,
        the text encoders' own device (``model.text_encoder_device``), the prompt cache."""
        PromptReader(self.reader.weighting, pipe, self._encoder_text).install(pipe)
        if self._text_encoder_device != "same":
            encode_on(pipe, self._text_encoder_device)
        self.prompts.install(pipe)

    @classmethod
    def load(cls, request: LoadRequest) -> DiffusersModel:
        """Load ``request``'s model (and its refiner, which shares the base's ``text_encoder_2``
        and VAE) as its family says."""
        model, refiner, family = request.name, request.refiner, request.traits.family
        device = pick_device(request.device)
        torch_dtype = pick_dtype(request.dtype, device)
        assert isinstance(family, DiffusersFamily)  # RUNTIMES["diffusers"] loads only these
        if request.offload != "none" and device != "cuda":
            raise ModelError(f"model.offload={request.offload} needs a CUDA device and this worker has none; run on GPU "
                             "workers (resources.gpus_per_worker=1), or set model.offload=none")
        if request.offload != "none" and request.text_encoder_device != "same":
            raise ModelError(f"model.offload={request.offload} moves the text encoders itself; set "
                             "model.text_encoder_device=same, or model.offload=none")
        # what job.preflight checked for the job's workers, checked on this one (bitsandbytes needs its GPU),
        # the refiner's too before anything loads
        no_gpu = f"this worker runs on {device}" if device != "cuda" else None
        check_loadable(model, read_quantizations(folder_json_reader(request.folder)), no_gpu)
        refiner_ref = (resolve(refiner, pin=request.refiner_pin, endpoint_url=request.endpoint_url, refiner_of=family)
                       if refiner is not None else None)
        if refiner_ref is not None:
            check_loadable(refiner_ref.name, refiner_ref.quantized, no_gpu)
        # offloading hooks move the modules themselves; text encoders kept apart never touch the device
        at = "cpu" if request.offload != "none" or request.text_encoder_device != "same" else device
        own = _own_components(family, model, request.folder)
        components = {**family.load_options, **dict.fromkeys(own), **_vae_override(request.folder, request.vae, torch_dtype),
                      **(image_encoder_components(request.ip_adapter[1], torch_dtype) if request.ip_adapter else {})}
        if request.checkpoint is not None:
            pipe = _load_single_file(family, model, request.checkpoint, request.folder, torch_dtype, components, at)
        else:
            pipe = _load_pipeline(family.txt2img, model, request.folder, torch_dtype, components, at)
        pipe.register_modules(**own)
        _load_embeddings(pipe, request.embeddings)
        controlnets = _load_controlnets(request.controlnets, family, torch_dtype,
                                        "cpu" if request.offload != "none" else device)
        _offload(pipe, request.offload)
        refiner_pipe, refiner_facts = None, {}
        if refiner_ref is not None:
            assert family.refiner is not None and refiner_ref.folder is not None  # resolve refused a family without one
            refiner_facts = {"refiner_name": refiner_ref.name, "refiner_pin": refiner_ref.pin, "refiner_fingerprint":
                             fingerprint_model_dir(refiner_ref.folder) if is_s3(refiner_ref.name) else refiner_ref.pin}
            # ensemble of experts: the refiner reads the base's second text encoder and VAE (no second copy)
            refiner_pipe = _load_pipeline(family.refiner, refiner_ref.name, refiner_ref.folder, torch_dtype, {
                "text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2, "vae": pipe.vae}, device)
        if request.text_encoder_device != "same":
            for stage in (pipe, refiner_pipe):
                if stage is not None:
                    place(stage, device, request.text_encoder_device)
        for name in family.sdpa_modules:
            getattr(pipe, name).set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA (flash / memory-efficient kernels)
        if refiner_pipe is not None:
            getattr(refiner_pipe, family.denoiser).set_attn_processor(AttnProcessor2_0())
        # after the SDPA switch, so the adapter's processors (and the plain ones it restores) are SDPA's
        ip_adapter = IPAdapterSwitch(pipe, request.ip_adapter[0]) if request.ip_adapter else None
        versions = {**software_versions(), **_quantized(pipe, refiner_pipe)}
        if request.text_encoder_device != "same":  # embeddings computed elsewhere can differ in the low bits
            versions["text_encoder_device"] = request.text_encoder_device
        if device == "cuda" and family.channels_last:  # on CPU it is slower and would change the recorded images' low bits
            for stage in (pipe, refiner_pipe):
                if stage is not None:
                    getattr(stage, family.denoiser).to(memory_format=torch.channels_last)
        speed = apply_speed(pipe, family.denoiser, request.speed or SpeedSpec(), device)
        if request.compile:
            setattr(pipe, family.denoiser, torch.compile(getattr(pipe, family.denoiser)))
            versions["torch_compile"] = family.denoiser  # compiled kernels can change the low bits: recorded
        info = ModelInfo(
            name=model,
            fingerprint=request.fingerprint,
            pin=request.pin,
            device=device,
            dtype=str(torch_dtype).removeprefix("torch."),
            versions=versions,
            threads=torch.get_num_threads(),
            family=family.class_name,
            **refiner_facts,
        )
        log.info("loaded %s model %s on %s (%s%s), fingerprint %s%s", family.name, model, device, info.dtype,
                 ", compiled" if request.compile else "", info.short_hash,
                 f", refiner {refiner} ({refiner_facts['refiner_fingerprint'][:10]})" if refiner_facts else "")
        return cls(pipe, info, request.traits, loras=request.loras, endpoint_url=request.endpoint_url,
                   compiled=request.compile or "regional_compile" in speed.applied, refiner=refiner_pipe, speed=speed,
                   embedding_names=tuple(name for name, _ in request.embeddings), prompt_syntax=request.prompt_syntax,
                   controlnets=controlnets, controlnet_fingerprints={name: fp for name, _, fp in request.controlnets},
                   ip_adapter=ip_adapter, text_encoder_device=request.text_encoder_device)

    def build_samplers(self) -> None:
        """Build every sampler of the family whose packages are installed from this model's
        scheduler config, so one that cannot be built fails the worker's start (a job-level
        error), not every shard. (A sampler missing a package is refused before the job starts:
        cli.preflight_samplers.)"""
        for name in self.family.samplers:
            sampler = SAMPLERS.get(name)
            if sampler is None or all(importlib.util.find_spec(m) for m in sampler.requires):
                for stage in self._schedulers:
                    try:
                        self.make_scheduler(name, stage)
                    except Exception as exc:  # noqa: BLE001 - any diffusers error: the model and sampler do not fit
                        built = f" ({sampler.diffusers_class})" if sampler else " (the model's own scheduler)"
                        model = self.info.refiner_name if stage == "refiner" else self.info.name
                        raise ModelError(f"sampler {name!r}{built} cannot be built from the scheduler config of "
                                         f"{stage} {model!r}: {type(exc).__name__}: {exc}") from exc

    def make_scheduler(self, name: str, stage: str = "base"):
        """Sampler ``name`` built from the scheduler config of ``stage`` (``base`` or ``refiner``)."""
        if name not in self.family.samplers:
            raise ModelError(f"scheduler {name!r} is not one of the {self.family.name} family's: {', '.join(self.family.samplers)}")
        own, config = self._schedulers[stage]
        if name == DEFAULT_SAMPLER:
            return own.from_config(config)
        sampler = SAMPLERS[name]
        return getattr(diffusers, sampler.diffusers_class).from_config({**config, **sampler.overrides})

    def scheduler_config(self, name: str) -> dict[str, Any]:
        """The full config of the sampler as used, for the metadata record (built once per
        name: every image's record needs it, and building a scheduler costs milliseconds)."""
        if name not in self._sampler_configs:
            self._sampler_configs[name] = dict(self.make_scheduler(name).config)
        return self._sampler_configs[name]

    def facts(self, row: Row) -> GenerationFacts:
        """What ``row``'s record says about how this model generates it."""
        info = self.info
        refined = row.refiner_switch is not None
        return GenerationFacts(
            model_name=info.name, model_family=info.family, model_fingerprint=info.fingerprint, device=info.device,
            dtype=info.dtype, versions=dict(info.versions), torch_threads=info.threads,
            scheduler_config=self.scheduler_config(row.scheduler),
            size_conditioning={k: list(v) for k, v in self.family.size_conditioning(row).items()},
            loras=tuple(self.loras.record(row.loras)),
            controlnets=tuple({"name": name, "scale": scale, "sha256": self._controlnet_fingerprints[name]}
                              for name, scale in parse_controlnets(row.controlnet)),
            # CLIP reads an interpreted prompt whole, in chunks
            prompt_truncated_at=None if self.reader.active else self._tokenizers.truncated_at(row.prompt),
            prompt_syntax="a1111" if self.reader.interpreted(row) else None,
            refiner_name=info.refiner_name if refined else None,
            refiner_fingerprint=info.refiner_fingerprint if refined else None,
            model_parameters=self.traits.recorded(),
            speed=self.speed.record(),
        )

    def recovered_from_out_of_memory(self, error: Exception) -> bool:
        if not isinstance(error, OUT_OF_MEMORY_ERRORS):
            return False
        free_device_memory()
        return True

    @torch.inference_mode()
    def generate(self, rows: list[Row], conditioning: ConditioningInputs = NO_CONDITIONING) -> GeneratedBatch:
        """Generate one canonical batch; all rows must share ``Row.batch_key()``. ``conditioning``:
        the batch's conditioning images, per row (init images and masks of an img2img or
        inpainting batch, control images of a ControlNet batch, reference images of an
        IP-Adapter batch)."""
        if not rows:
            return GeneratedBatch(np.zeros((0, 0, 0, 3), np.uint8), [])
        key = rows[0].batch_key()
        if any(r.batch_key() != key for r in rows):
            raise ValueError("generate() takes one canonical batch: all rows must share batch_key()")
        groups = self.reader.groups(rows)
        if len(groups) == 1:
            return self._generate(rows, conditioning)
        # rows of different chunk counts run apart, each group as its own batch: no row's
        # conditioning is padded by another's length (PromptReader)
        pixels: np.ndarray | None = None
        errors: list[str | None] = [None] * len(rows)
        for group in groups:
            part = self._generate([rows[i] for i in group], conditioning.pick(group))
            if pixels is None:
                pixels = np.empty((len(rows), *part.pixels.shape[1:]), part.pixels.dtype)
            pixels[group] = part.pixels
            for i, error in zip(group, part.errors):
                errors[i] = error
        assert pixels is not None
        return GeneratedBatch(pixels, errors)

    def _generate(self, rows: list[Row], conditioning: ConditioningInputs) -> GeneratedBatch:
        key = rows[0].batch_key()
        if self.compiled and (len(rows), key) not in self._warm_shapes:
            # compile for this batch shape now, with a one-step run, so the first real batch
            # (and the hang watchdog's idea of a batch's duration) does not include compiling
            self._warm_shapes.add((len(rows), key))
            started = time.perf_counter()
            self._denoise([replace(r, steps=1, hires_steps=None) for r in rows], conditioning)
            self.warmup_seconds += time.perf_counter() - started
            log.info("compiled for batch shape %d × %dx%d in %.1f s", len(rows), rows[0].width, rows[0].height,
                     time.perf_counter() - started)
        latents = self._denoise(rows, conditioning)
        return self._decode(latents)

    def memory_probe(self, rows: list[Row], conditioning: ConditioningInputs = NO_CONDITIONING) -> int | None:
        """The device's peak bytes while generating ``rows`` (with their ``conditioning``) for one
        step, decoding included, or None when they do not fit (``run.batch_fit``; CUDA only)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.inference_mode():
                for group in self.reader.groups(rows):
                    self._decode(self._denoise([replace(rows[i], steps=1, hires_steps=None) for i in group],
                                               conditioning.pick(group)))
        except OUT_OF_MEMORY_ERRORS:
            free_device_memory()
            return None
        return int(torch.cuda.max_memory_allocated())

    def _call_kwargs(self, rows: list[Row]) -> dict[str, Any]:
        """The pipeline arguments of one canonical batch that follow from its rows: the family's,
        a CPU generator per row seeded with its seed, latent output."""
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        common = dict(**self.family.pipeline_kwargs(rows, self.traits), generator=generators, output_type="latent")
        for key in ("prompt", "negative_prompt"):
            if isinstance(common.get(key), list):
                common[key] = [self._encoder_text(p) for p in common[key]]
        return common

    def _controlnet_pipe(self, names: tuple[str, ...]) -> Any:
        """The family's ControlNet pipeline for these ControlNets (several: a MultiControlNet),
        made once with ``from_pipe`` on the text-to-image pipeline's modules (no second copy)."""
        if names not in self._controlnet_pipes:
            models = [self._controlnets[name] for name in names]
            pipe = getattr(diffusers, self.family.controlnet).from_pipe(
                self.txt2img, controlnet=models[0] if len(models) == 1 else models)
            pipe.set_progress_bar_config(disable=True)
            self._install_prompt_path(pipe)
            if self.ip_adapter is not None:
                self.ip_adapter.install(pipe)
            self._controlnet_pipes[names] = pipe
        return self._controlnet_pipes[names]

    def _control_kwargs(self, rows: list[Row],
                        control_images: tuple[tuple[Image.Image, ...], ...] | None) -> tuple[Any, dict[str, Any]]:
        """A ControlNet batch's pipeline and arguments: per ControlNet, its scale and every
        row's control image (one image given for several ControlNets conditions each)."""
        first = rows[0]
        controlnets = parse_controlnets(first.controlnet)
        if first.is_img2img:
            raise ModelError(f"row {first.id} has an init image and ControlNets; sdbatch runs ControlNets on "
                             "text-to-image rows only")
        # per row, its image for each ControlNet (the nested form MultiControlNet pipelines take)
        per_row = [[resize_for_row(images[k % len(images)], first.width, first.height) for k in range(len(controlnets))]
                   for images in _one_each(control_images, rows, "list of control images")]
        pipe = self._controlnet_pipe(tuple(name for name, _ in controlnets))
        scales = [scale for _, scale in controlnets]
        argument, layout = self.family.controlnet_image
        if len(controlnets) == 1:
            return pipe, {argument: [images[0] for images in per_row], "controlnet_conditioning_scale": scales[0]}
        nested = per_row if layout == "per_row" else [list(images) for images in zip(*per_row, strict=True)]
        return pipe, {argument: nested, "controlnet_conditioning_scale": scales}

    def _denoise(self, rows: list[Row], conditioning: ConditioningInputs) -> torch.Tensor:
        first = rows[0]
        for rule in self._row_rules:
            for row in rows:  # a negative prompt is per row
                rule.check_row(row)
        common = self._call_kwargs(rows)
        self.loras.use(first.loras)
        if first.is_img2img and self.img2img is None:
            raise ModelError(f"row {first.id} has an init image, but {self.family.name} models have no img2img pipeline")
        if self.family.edits and not first.is_img2img:
            raise ModelError(f"row {first.id} has no init_image, and {self.family.name} models edit one")
        if (first.is_inpaint and self.inpaint is None) or (first.hires_scale is not None and self.img2img is None):
            raise ModelError(f"row {first.id}: {self.family.name} models take no mask_image or hires-fix pass here")
        self.prompts.context = first.loras  # an adapter on a text encoder changes its embeddings
        pipe: Any = self.inpaint if first.is_inpaint else self.img2img if first.is_img2img else self.txt2img
        control: dict[str, Any] = {}
        if first.controlnet is not None:
            pipe, control = self._control_kwargs(rows, conditioning.control_images)
        reference = self._reference_kwargs(rows, conditioning.ip_adapter_images, common)
        pipe.scheduler = self.make_scheduler(first.scheduler)
        switch = first.refiner_switch
        if switch is not None and self.refiner is None:
            raise ModelError(f"row {first.id} has refiner_switch {switch:g} but no refiner is loaded (model.refiner)")
        # ensemble of experts: the base stops at the switch, the refiner denoises the rest
        stop = {"denoising_end": switch} if switch is not None else {}
        if first.is_img2img:
            images = [resize_for_row(img, first.width, first.height)
                      for img in _one_each(conditioning.init_images, rows, "init image")]
            extra = self.family.img2img_kwargs(first)
            if first.is_inpaint:  # the mask cropped as its init image is; white = repaint
                extra = {"strength": first.strength, "mask_image": [resize_for_row(m, first.width, first.height)
                                                                    for m in _one_each(conditioning.masks, rows, "mask")],
                         "height": first.height, "width": first.width}
            latents = pipe(image=images, **extra, **reference, **stop, **common).images
        else:
            with _control_images_encoded_to_mean(pipe.vae) if control else nullcontext():
                latents = pipe(height=first.height, width=first.width, **control, **reference, **stop, **common).images
        if switch is not None:
            self.refiner.scheduler = self.make_scheduler(first.scheduler, "refiner")
            latents = self.refiner(image=latents, denoising_start=switch, **common).images
        else:
            latents = self.family.unpack_latents(pipe, latents, first)
        if first.hires_scale is not None:
            second: Any = self.img2img  # checked above
            second.scheduler = self.make_scheduler(first.scheduler)
            # the second pass sees the reference image too (A1111 conditions both passes)
            latents = hires_pass(second, latents, rows, lambda part: {**self._call_kwargs(part), **reference})
        return latents

    def _reference_kwargs(self, rows: list[Row], images: tuple[Image.Image, ...] | None,
                          common: dict[str, Any]) -> dict[str, Any]:
        """An IP-Adapter batch's reference-image embeddings, the adapter switched on at the batch's
        ``ip_adapter_scale``; the adapter switched off for any other batch."""
        first = rows[0]
        if self.ip_adapter is None:
            if first.ip_adapter_scale is not None:
                raise ModelError(f"row {first.id} has an ip_adapter_image, but no IP-Adapter is loaded (ip_adapter)")
            return {}
        self.ip_adapter.use(first.ip_adapter_scale)
        if first.ip_adapter_scale is None:
            return {}
        above = self.traits.unconditional_above  # the pipeline runs both guidance branches above it
        guided = above is not None and float(common.get("guidance_scale") or 0) > above
        return {"ip_adapter_image_embeds": self.ip_adapter.embeds(_one_each(images, rows, "IP-Adapter reference image"),
                                                                  guided)}

    def _encoder_text(self, prompt: str) -> str:
        """A row's prompt as the pipeline is given it: ComfyUI's embedding:NAME is the token
        <NAME> the embedding is loaded under."""
        return embedding_tokens(prompt, self._embedding_names) if self._embedding_names and prompt else prompt

    def _decode(self, latents: torch.Tensor) -> GeneratedBatch:
        """Latents → uint8 pixels on the device → one copy to the host; bad rows (see the
        module docstring) are decoded once more with the VAE in float32."""
        errors: list[str | None] = [
            None if ok else "the denoiser produced NaN/inf latents; no image was stored"
            for ok in torch.isfinite(latents).flatten(1).all(dim=1).tolist()
        ]
        pixels, bad = self._decode_pixels(latents)
        retry = [i for i, b in enumerate(bad) if b and errors[i] is None]
        if retry:
            # the whole batch again, not the bad rows alone: a row's pixels depend (in the last
            # bit) on its batch, and `reproduce` must meet the same failure and the same retry
            vae = self.txt2img.vae
            dtype = vae.dtype
            log.warning("rows %s of a batch decoded to NaN/inf or black pixels: decoding the batch "
                        "again with the VAE in float32", retry)
            vae.to(torch.float32)
            try:
                again, still_bad = self._decode_pixels(latents.float())
            finally:
                vae.to(dtype)
            for i in retry:
                pixels[i] = again[i]
                if still_bad[i]:
                    errors[i] = f"the VAE decoded this row to {still_bad[i]} pixels, also with the VAE in float32; no image was stored"
        return GeneratedBatch(pixels.cpu().numpy(), errors)

    def _decode_pixels(self, latents: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
        """(rows, h, w, 3) uint8 on the device, and per row None or what is wrong with it."""
        vae = self.txt2img.vae
        decoded = self.family.vae_decode(vae, latents)
        finite = torch.isfinite(decoded).flatten(1).all(dim=1).tolist()
        image = self.txt2img.image_processor.postprocess(decoded, output_type="pt", do_denormalize=[True] * len(decoded))
        # the same arithmetic as diffusers' numpy_to_pil (float32, ×255, round), on the device
        pixels = (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
        black = (pixels.flatten(1).amax(dim=1) == 0).tolist()
        return pixels, [None if ok and not dark else ("NaN/inf" if not ok else "all-black") for ok, dark in zip(finite, black)]


def _one_each(images: Sequence[Any] | None, rows: list[Row], what: str) -> list[Any]:
    """A batch's conditioning images of one kind, one per row (ValueError otherwise)."""
    if images is None or len(images) != len(rows) or any(i is None for i in images):
        raise ValueError(f"these rows need one {what} each")
    return list(images)


#: The loaders of the family runtimes that need torch (``FamilyAdapter.runtime``); the others are
#: ``models.loading.TORCH_FREE_RUNTIMES``.
RUNTIMES: dict[str, Callable[[LoadRequest], LoadedModel]] = {
    "diffusers": DiffusersModel.load,
}


def load_model(
    model: str = "builtin:shapes",
    *,
    pin: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    endpoint_url: str | None = None,
    loras: dict[str, str] | None = None,
    compile: bool = False,
    refiner: str | None = None,
    refiner_pin: str | None = None,
    config: str | None = None,
    offload: str = "none",
    text_encoder_device: str = "same",
    speed: SpeedSpec | None = None,
    vae: str | None = None,
    embeddings: dict[str, str] | None = None,
    prompt_syntax: str = "a1111",
    controlnets: dict[str, str] | None = None,
    ip_adapter: tuple[str, str] | None = None,
) -> LoadedModel:
    """Resolve ``model`` (and check it against ``pin``; ``config``: ``model`` is a single-file
    checkpoint and this its configuration's folder; ``vae``: a VAE folder in place of its own),
    then load it with its family's runtime, its samplers built (one that cannot be built fails
    the load, not every shard; ``prompt_syntax``: how prompts are read, ``model.prompt_syntax``)."""
    request = load_request(model, pin=pin, endpoint_url=endpoint_url, config=config, vae=vae, embeddings=embeddings,
                           controlnets=controlnets, ip_adapter=ip_adapter, device=device, dtype=dtype, loras=loras,
                           compile=compile, refiner=refiner, refiner_pin=refiner_pin, offload=offload,
                           text_encoder_device=text_encoder_device, speed=speed, prompt_syntax=prompt_syntax)
    return load_torch_free(request) or load(request)


def load(request: LoadRequest) -> LoadedModel:
    """Load a resolved model whose family runs on torch with its runtime (``RUNTIMES``), its samplers built;
    ``models.loader.load`` and ``load_model`` load a torch-free family without it."""
    loaded = RUNTIMES[request.traits.family.runtime](request)
    loaded.build_samplers()
    return loaded
