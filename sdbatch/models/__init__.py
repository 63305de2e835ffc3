"""Built-in models shipped inside the package as ordinary diffusers folders, and the batch
every model returns.

A built-in model is named ``builtin:NAME`` and resolves to ``sdbatch/models/NAME/``, which is
loaded by exactly the same code as any user-supplied diffusers folder (``builtin:null``'s
folder names a model that is not a diffusers pipeline: ``null_model.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

BUILTIN_PREFIX = "builtin:"


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


def builtin_names() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "model_index.json").is_file())


def resolve_builtin(name: str) -> Path:
    """Map ``builtin:NAME`` (or ``NAME``) to the folder of that built-in model."""
    short = name.removeprefix(BUILTIN_PREFIX)
    folder = MODELS_DIR / short
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"unknown built-in model {name!r}; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in builtin_names())
        )
    return folder


def fingerprint_model_dir(folder: Path) -> str:
    """sha256 over every config and weight file of a diffusers folder (relative path + bytes),
    so two folders with the same weights and configs have the same fingerprint wherever they live."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in Path(folder).rglob("*")
        if p.is_file() and p.suffix in {".json", ".safetensors", ".txt"} and p.name != "README.md"
    )
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def local_model_dir(name: str) -> Path:
    """``builtin:NAME`` or a local diffusers folder → its path; ValueError naming the fix."""
    if name.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name)
    folder = Path(name).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"model {name!r}: no model_index.json there; pass a diffusers folder "
            "(as written by save_pretrained), an s3:// prefix holding one, or builtin:shapes"
        )
    return folder.resolve()


def local_model_fingerprint(name: str) -> str | None:
    """The fingerprint of a built-in or local model folder, computed without loading it;
    None for an ``s3://`` model (its workers record the fingerprint of what they load)."""
    return None if name.startswith("s3://") else fingerprint_model_dir(local_model_dir(name))
