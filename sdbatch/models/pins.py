"""Pinning a model's files by content and the one policy on what a model may hold: no pickles,
no custom code, LoRA files as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from sdbatch.data.loras import LoraError
from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import GGUF_SUFFIX, PICKLE_SUFFIXES, ModelError

#: where a component of model_index.json may come from; any other "library" is custom code
COMPONENT_LIBRARIES = ("diffusers", "transformers")


#: files of a model folder that are not part of the model (docs, the download cache's marker)
_NOT_MODEL_FILES = ("README.md",)


def _model_files(folder: Path) -> list[Path]:
    """Every file of the model: all component folders, all kinds (a tokenizer's
    ``spiece.model`` decides images as much as a weight file does); not dotfiles, not docs.
    Symbolic links are followed, folders as well as files, because the loader reads through
    them: a component folder linked from elsewhere (a ``unet`` → ``../unet-v2`` switch, the
    Hugging Face cache's snapshots) is pinned by what it holds. A link to a folder containing
    it (a loop) is refused, naming the link."""
    folder = Path(folder)
    files = []
    above: dict[str, set[Path]] = {str(folder): {folder.resolve()}}  # each folder's real path and its parents'
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here, chain = Path(dirpath), above.pop(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in dirnames:
            target = (here / name).resolve()
            if target in chain:
                raise ModelError(
                    f"model at {folder}: {(here / name).relative_to(folder)} is a symbolic link to {target}, a "
                    "folder that contains it (a loop); replace the link with the component folder itself"
                )
            above[str(here / name)] = chain | {target}
        files += [here / n for n in filenames
                  if not n.startswith(".") and n not in _NOT_MODEL_FILES and (here / n).is_file()]
    return sorted(files)


def fingerprint_model_dir(folder: Path) -> str:
    """sha256 over every file of a diffusers folder (relative path + bytes), so two folders
    with the same files have the same fingerprint wherever they live."""
    digest = hashlib.sha256()
    for path in _model_files(folder):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def single_file_pin(checkpoint: Path, config_pin: str) -> str:
    """The pin of a single-file checkpoint loaded with the configuration of a folder: the
    sha256 of the file's bytes and the folder's pin (its other components are loaded from it)."""
    return "single-file:" + hashlib.sha256(f"{file_sha256(checkpoint)}:{config_pin}".encode()).hexdigest()


def vae_pin(model_pin: str, vae_fingerprint: str) -> str:
    """The pin of a model loaded with another VAE folder (``model.vae``): its own pin and the
    VAE folder's content fingerprint."""
    return "vae:" + hashlib.sha256(f"{model_pin}:{vae_fingerprint}".encode()).hexdigest()


def embeddings_pin(model_pin: str, sha256: dict[str, str]) -> str:
    """The pin of a model loaded with textual-inversion embeddings (``embeddings``): its own pin
    and each embedding's name and sha256."""
    return "ti:" + hashlib.sha256(f"{model_pin}:{json.dumps(sorted(sha256.items()))}".encode()).hexdigest()


def controlnets_pin(model_pin: str, fingerprints: dict[str, str]) -> str:
    """The pin of a model loaded with ControlNets (``controlnets``): its own pin and each
    ControlNet folder's name and content fingerprint."""
    return "cn:" + hashlib.sha256(f"{model_pin}:{json.dumps(sorted(fingerprints.items()))}".encode()).hexdigest()


def ip_adapter_pin(model_pin: str, weights_sha256: str, encoder_fingerprint: str) -> str:
    """The pin of a model loaded with an IP-Adapter (``ip_adapter``): its own pin, the weights
    file's sha256 and the image encoder folder's content fingerprint."""
    return "ipa:" + hashlib.sha256(f"{model_pin}:{weights_sha256}:{encoder_fingerprint}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_tensor_names(checkpoint: Path, where: str) -> list[str]:
    """The tensor names of a ``.safetensors`` (or ``.gguf``) checkpoint, read from its header
    alone; ModelError for a file that is not one (a pickle under a safetensors name above all)."""
    if checkpoint.suffix.lower() == GGUF_SUFFIX:
        return gguf_tensor_names(checkpoint, where)
    with checkpoint.open("rb") as fh:
        head = fh.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = fh.read(size) if 2 <= size <= 100 * 2**20 else b""
    try:
        names = json.loads(header)
    except ValueError:
        names = None
    if not isinstance(names, dict):
        raise ModelError(f"model {where}: not a safetensors file (pickle checkpoints are refused); convert it with "
                         "safetensors.torch.save_file")
    return [n for n in names if n != "__metadata__"]


def gguf_tensor_names(checkpoint: Path, where: str) -> list[str]:
    """The tensor names of a GGUF file (the ``gguf`` package's reader maps the file, reading its
    header); ModelError when the package is missing or the file is not GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"model {where}: a .gguf checkpoint needs the gguf package, which diffusers' GGUF loader "
                         "reads it with: pip install 'gguf>=0.19' (a dependency of sdbatch) on the driver and every worker") from None
    try:
        return [tensor.name for tensor in GGUFReader(checkpoint).tensors]
    except (ValueError, OSError) as exc:
        raise ModelError(f"model {where}: not a GGUF file ({exc}); a .gguf checkpoint is a transformer as "
                         "city96/QuantStack publish them (FLUX.1, Qwen-Image, Z-Image)") from None


def s3_pin(objects: dict[str, tuple[int, str]]) -> str:
    """The pin of an ``s3://`` model: its files' relative names, sizes and ETags."""
    listing = json.dumps(sorted((rel, size, etag) for rel, (size, etag) in objects.items()))
    return "s3-etags:" + hashlib.sha256(listing.encode()).hexdigest()


def refuse_pickles(where: str, names: Iterable[str]) -> None:
    """The pickle policy (one, for local folders and s3:// prefixes alike)."""
    bad = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if bad:
        shown = ", ".join(bad[:5]) + (f" … (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ModelError(
            f"model at {where} contains pickle checkpoint files ({shown}); sdbatch loads safetensors only "
            "and refuses any folder holding pickles. Convert the weights to *.safetensors "
            "(diffusers save_pretrained(safe_serialization=True)) and remove the pickle files"
        )


def refuse_custom_code(where: str, names: Iterable[str], read: JsonReader) -> None:
    """The code policy (one, for local folders and s3:// prefixes alike): sdbatch runs only the
    diffusers and transformers classes a folder names, never code the folder brings — a
    component whose library in model_index.json is a module of its own, a ``*.py`` file, a
    config's ``auto_map``. Each would fail every worker start; refused here, naming it."""
    fix = ("; sdbatch runs no code shipped with a model: save the pipeline with stock diffusers/transformers "
           "components (save_pretrained) and remove the custom code")
    code = sorted(n for n in names if n.lower().endswith(".py"))
    if code:
        raise ModelError(f"model at {where} ships Python code ({', '.join(code[:5])}){fix}")
    for component, entry in (read("model_index.json") or {}).items():
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue  # the pipeline's own keys, options, and components left out ([null, null])
        library, class_name = entry
        if library not in COMPONENT_LIBRARIES:
            raise ModelError(f"model at {where}: model_index.json component {component!r} is {class_name!r} from "
                             f"{library!r}, custom code rather than a class of {' or '.join(COMPONENT_LIBRARIES)}{fix}")
    for name in sorted(n for n in names if n.endswith("config.json")):
        config = read(name)
        if isinstance(config, dict) and "auto_map" in config:
            raise ModelError(f"model at {where}: {name} has an auto_map (classes loaded from custom code){fix}")


def check_pickles(where: str, folder: Path) -> None:
    """The pickle policy on a local folder (a diffusers model, or ``scoring.clip_model``)."""
    refuse_pickles(where, model_file_names(folder))


def model_file_names(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in _model_files(folder)]


def check_safetensors(data: bytes, where: str) -> None:
    """Refuse anything that is not a safetensors file (pickles above all): its 8-byte header
    length and JSON header must parse."""
    if len(data) >= 8:
        (size,) = struct.unpack("<Q", data[:8])
        if 2 <= size <= len(data) - 8:
            try:
                json.loads(data[8 : 8 + size])
                return
            except ValueError:
                pass
    raise LoraError(f"LoRA {where}: not a safetensors file (pickle checkpoints are refused); "
                    "convert it with safetensors.torch.save_file")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
