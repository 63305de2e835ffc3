"""The built-in models shipped in the package (``builtin:NAME``) and where a local model lives."""

from __future__ import annotations

from pathlib import Path

from sdbatch.models.errors import ModelError

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
