"""Models, torch-free: resolution, preflight, fingerprint and the one pickle policy.

A model is ``builtin:NAME`` (a diffusers folder shipped in ``sdbatch/models/NAME/``), a local
diffusers folder, or an ``s3://`` prefix holding one. Everything here runs without torch, so
``submit`` can refuse a model before any worker starts:

- **one pickle policy**, the same for local folders and ``s3://`` prefixes: a model holding any
  pickle checkpoint (``*.bin``, ``*.ckpt``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``) is
  refused, even next to safetensors — sdbatch loads safetensors only and never ships a folder
  whose other files a loader could be tricked into unpickling;
- **one code policy**: sdbatch runs only stock diffusers/transformers classes; a folder whose
  ``model_index.json`` names a component from a module of its own, that holds ``*.py`` files,
  or whose configs carry an ``auto_map`` is refused at submit, naming it;
- **the family**, from ``model_index.json`` ``_class_name`` (``families.FAMILIES``): a pipeline
  class sdbatch does not run exits 2, naming the class found and the supported ones
  (``SdbatchNullModel``: ``builtin:null``'s folder names a model that is not a diffusers
  pipeline, ``null_model.py``); a ``model.refiner`` must be the class its base's family takes.
  ``model_index.json`` and the configs are read once (``JsonReader``), and the same read gives
  the family and native size (``ModelRef.traits``);
- **the pin**, recorded in ``job.json`` at submit and compared with every worker's before it
  gets a shard: a local folder's content fingerprint (sha256 over every file of every component
  folder, read through symbolic links as the loader reads them), an ``s3://`` prefix's ETags
  and sizes (``s3-etags:<sha256>``), which also key the
  per-node download cache.

It also owns ``GeneratedBatch``, the batch every model returns.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdbatch.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image

    from sdbatch.families import Family, ModelTraits

BUILTIN_PREFIX = "builtin:"
#: A model folder's JSON files: relative path -> parsed JSON, or None where there is no such file.
JsonReader = Callable[[str], Any]


@dataclass
class GeneratedBatch:
    """One batch's images as a (rows, height, width, 3) uint8 host array, and per row either
    None or why its image is unusable (it must then not be stored as a success)."""

    pixels: np.ndarray
    errors: list[str | None]

    def images(self) -> list[Image.Image]:
        from PIL import Image

        return [Image.fromarray(p) for p in self.pixels]


MODELS_DIR = Path(__file__).resolve().parent
NULL_CLASS_NAME = "SdbatchNullModel"  # builtin:null (null_model.py), drawn with numpy
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
#: where a component of model_index.json may come from; any other "library" is custom code
COMPONENT_LIBRARIES = ("diffusers", "transformers")
#: files of a model folder that are not part of the model (docs, the download cache's marker)
_NOT_MODEL_FILES = ("README.md",)


class ModelError(BadInput, ValueError):
    """The model cannot be used: the message names the model and the fix."""


def builtin_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve_builtin(name: str) -> Path:
    """Map ``builtin:NAME`` (or ``NAME``) to the folder of that built-in model."""
    short = name.removeprefix(BUILTIN_PREFIX)
    folder = MODELS_DIR / short
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"unknown built-in model {name!r}; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
        )
    return folder


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


def folder_json_reader(folder: Path) -> JsonReader:
    """The JSON files of a local model folder, each read (and parsed) at most once."""

    @functools.cache
    def read(rel: str) -> Any:
        path = folder / rel
        return _parse_json(path.read_bytes(), rel, str(folder)) if path.is_file() else None

    return read


def storage_json_reader(storage: Any, where: str) -> JsonReader:
    """The JSON files under an ``s3://`` model prefix, each read at most once; ModelError when
    the prefix cannot be read."""
    from sdbatch.storage import NotFound, StorageError

    @functools.cache
    def read(rel: str) -> Any:
        try:
            return _parse_json(storage.get(rel), rel, where)
        except NotFound:
            return None
        except StorageError as exc:
            raise ModelError(f"model {where!r}: {exc}") from None

    return read


def _parse_json(data: bytes, rel: str, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ModelError(f"model at {where}: {rel} is not valid JSON; pass a diffusers folder as written by "
                         "save_pretrained") from None


def model_json_reader(name: str, endpoint_url: str | None = None) -> JsonReader:
    """The JSON reader of ``builtin:NAME``, a local folder or an ``s3://`` prefix (which must
    hold a model_index.json), for its configs alone (no listing, no pin)."""
    if not name.startswith("s3://"):
        return folder_json_reader(local_model_dir(name))
    from sdbatch.storage import StorageError, open_storage

    try:
        read = storage_json_reader(open_storage(name, endpoint_url=endpoint_url), name)
    except StorageError as exc:
        raise ModelError(f"model {name!r}: {exc}") from None
    if read("model_index.json") is None:
        raise ModelError(f"model {name!r}: no model_index.json under that prefix; it must hold a diffusers folder")
    return read


def local_model_dir(name: str) -> Path:
    """``builtin:NAME`` or a local diffusers folder → its path; ModelError naming the fix."""
    if name.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name)
    folder = Path(name).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"model {name!r}: no model_index.json there; pass a diffusers folder "
            "(as written by save_pretrained), an s3:// prefix holding one, or builtin:shapes"
        )
    return folder.resolve()


def check_pickles(where: str, folder: Path) -> None:
    """The pickle policy on a local folder (a diffusers model, or ``scoring.clip_model``)."""
    refuse_pickles(where, _file_names(folder))


def _file_names(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in _model_files(folder)]


def _check_folder(where: str, folder: Path, read: JsonReader) -> None:
    """The pickle and code policies on a local model folder."""
    names = _file_names(folder)
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


def _check_configs(where: str, read: JsonReader, refiner_of: Family | None) -> ModelTraits | None:
    """The family rule on the configs ``read`` reads: a model's traits, or (``refiner_of``: the
    base's family) the refiner's class check."""
    from sdbatch.families import check_refiner, read_traits

    if refiner_of is not None:
        check_refiner(read, where, refiner_of)
        return None
    return read_traits(read, where)


def preflight(name: str, *, endpoint_url: str | None = None, refiner_of: Family | None = None) -> ModelRef:
    """Check the model (or, ``refiner_of`` given, the refiner of a base of that family) before
    any worker starts — pickles, family — and pin it; model_index.json and the configs are read
    once. ModelError or FamilyError, or a StorageError for an s3:// prefix that cannot be read."""
    if not name.startswith("s3://"):
        folder = local_model_dir(name)
        read = folder_json_reader(folder)
        _check_folder(name, folder, read)
        return ModelRef(name, fingerprint_model_dir(folder), _check_configs(name, read, refiner_of))
    from sdbatch.storage import open_storage

    storage = open_storage(name, endpoint_url=endpoint_url)
    objects = storage.objects("")
    if "model_index.json" not in objects:
        raise ModelError(f"model {name!r}: no model_index.json under that prefix; it must hold a diffusers folder")
    refuse_pickles(name, objects)
    read = storage_json_reader(storage, name)
    refuse_custom_code(name, objects, read)
    return ModelRef(name, s3_pin(objects), _check_configs(name, read, refiner_of))


def resolve(name: str, *, pin: str | None = None, endpoint_url: str | None = None,
            refiner_of: Family | None = None) -> ModelRef:
    """The local folder to load ``name`` from (an s3:// prefix is downloaded once per node,
    into a cache keyed by its pin) and the pin of what that folder holds, checked by the same
    policy as at preflight."""
    if name.startswith("s3://"):
        from sdbatch.storage import fetch_model_dir

        folder, found = fetch_model_dir(name, pin=pin, endpoint_url=endpoint_url)
    else:
        folder = local_model_dir(name)
        found = fingerprint_model_dir(folder)
    read = folder_json_reader(folder)
    _check_folder(name, folder, read)
    return ModelRef(name, found, _check_configs(name, read, refiner_of), folder)
