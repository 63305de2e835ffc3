"""Built-in models shipped inside the package as ordinary diffusers folders.

A built-in model is named ``builtin:NAME`` and resolves to ``sdbatch/models/NAME/``, which is
loaded by exactly the same code as any user-supplied diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
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
