"""The built-in models shipped in the package (``builtin:NAME``) and where a local model lives."""

from __future__ import annotations

import re
from pathlib import Path

from sdbatch.models.errors import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, ModelError, pickle_checkpoint_fix

BUILTIN_PREFIX = "builtin:"


MODELS_DIR = Path(__file__).resolve().parent


NULL_CLASS_NAME = "SdbatchNullModel"  # builtin:null (families/null.py), drawn with numpy


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


def local_model_dir(name: str) -> Path:
    """``builtin:NAME`` or a local diffusers folder → its path; ModelError naming what the name
    is instead (missing, a Hugging Face Hub id, a checkpoint file, a folder of another kind) and
    the fix."""
    if name.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name)
    folder = Path(name).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"model {name!r}: {_not_a_folder(name, folder)}")
    return folder.resolve()


#: a Hugging Face Hub repo id: ``owner/name``, nothing more
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

#: what a diffusers folder is, and every other way to give a model
_MODEL_FORMS = ("pass a diffusers folder (as written by save_pretrained), an s3:// prefix holding one, a single-file "
                ".safetensors or .gguf checkpoint with --model-config (model.config), or builtin:shapes")


def _not_a_folder(name: str, folder: Path) -> str:
    """Why ``folder``, holding no model_index.json, is no model, and the fix."""
    if not folder.exists():
        if _HUB_ID.fullmatch(name):
            return (f"no such folder (relative to {Path.cwd()}); it looks like a Hugging Face Hub repo id, and sdbatch "
                    f"never downloads models: fetch it once (hf download {name} --local-dir models/{name.split('/')[1]}) "
                    "and pass that folder, copied to every node or uploaded to s3://")
        return f"no such file or folder (relative paths are read from {Path.cwd()}); check the path, or {_MODEL_FORMS}"
    if folder.is_file():
        if name.lower().endswith(PICKLE_SUFFIXES):
            return pickle_checkpoint_fix(name)
        if name.lower().endswith(SINGLE_FILE_SUFFIXES):
            return ("a single-file checkpoint: give the diffusers folder of its architecture as --model-config "
                    "(model.config), which supplies its configuration and the components the file lacks")
        return f"a file of a kind sdbatch does not load; {_MODEL_FORMS}"
    return f"a folder with no model_index.json, so not a diffusers pipeline folder; {_MODEL_FORMS}"
