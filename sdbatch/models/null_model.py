"""``builtin:null``: a "model" that draws each row's picture from its seed and size at almost
no cost, for measuring the machinery (batching, encode, hash, store, commit) and for scale
tests — not for users' images.

The picture is smooth colour gradients and waves plus per-pixel noise, so its PNGs cost what
real images cost to encode (a 512² PNG at level 1 is about 520 KB). It depends on the row's
seed, width and height only — never on its batch-mates, prompt or sampler — and is drawn with
numpy alone (no torch). ``NullGenerator`` has the interface of ``generate.Generator``, so the worker,
``reproduce`` and ``verify`` run it like any model; ``model_index.json`` in ``models/null/``
names it (and its ``version``, part of the model fingerprint, changes whenever the drawing does).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdbatch.data.row import Row
from sdbatch.models.adapter import GeneratedBatch
from sdbatch.models.builtin import NULL_CLASS_NAME

NOISE_BITS = 4  # per-pixel noise of 16 levels: sets the PNG size (≈ 4 bits per sample)
SMOOTH_CELL = 4  # pixels per side of the grid the gradients and waves are drawn on


def draw(seed: int, width: int, height: int) -> np.ndarray:
    """The (height, width, 3) uint8 picture of ``seed``: a bilinear gradient between four random
    corner colours and two random waves, drawn on a grid of ``SMOOTH_CELL``-pixel cells (the
    smooth part needs no more; per-pixel float work would cost a third of a PNG encode), plus
    per-pixel uniform noise."""
    rng = np.random.default_rng(seed)
    rows, cols = -(-height // SMOOTH_CELL), -(-width // SMOOTH_CELL)
    corners = rng.uniform(40, 215, size=(2, 2, 3)).astype(np.float32)
    y = np.linspace(0, 1, rows, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, cols, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - x) + corners[0, 1] * x
    bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
    picture = top * (1 - y) + bottom * y
    for _ in range(2):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        colour = rng.uniform(-25, 25, size=3).astype(np.float32)
        picture = picture + np.sin(2 * np.pi * (fx * x + fy * y) + phase) * colour
    # the smooth part stays within [0, 255 - 15], so adding the noise cannot overflow uint8
    smooth = np.clip(picture, 0, 255 - (1 << NOISE_BITS) + 1).astype(np.uint8)
    smooth = smooth.repeat(SMOOTH_CELL, axis=0).repeat(SMOOTH_CELL, axis=1)[:height, :width]
    noise = np.frombuffer(rng.bytes(height * width * 3), np.uint8).reshape(height, width, 3)
    picture = noise >> (8 - NOISE_BITS)
    picture += smooth
    return picture


@dataclass(frozen=True)
class NullModelInfo:
    """What ``generate.ModelInfo`` holds, for the null model (no device, no dtype, no threads)."""

    name: str
    fingerprint: str
    pin: str  # what the job pins the model to (sdbatch.models), checked by the worker's ready()
    device: str = "cpu"
    dtype: str = "uint8"
    versions: dict[str, str] | None = None
    threads: int = 1
    family: str = NULL_CLASS_NAME  # model_index.json _class_name, as ModelInfo.family
    refiner_pin: None = None  # the null model takes no refiner (families.FAMILIES)

    @property
    def short_hash(self) -> str:
        return self.fingerprint[:10]


class NullGenerator:
    """Draws each row with ``draw``; img2img rows ignore their init image (it is still read,
    hashed and recorded by the worker, so that path is measured too)."""

    def __init__(self, info: NullModelInfo, config: dict[str, Any]):
        self.info = info
        self.config = config

    @classmethod
    def from_folder(cls, name: str, folder: Path, fingerprint: str, pin: str) -> NullGenerator:
        config = json.loads((folder / "model_index.json").read_text())
        versions = {"numpy": np.__version__, "python": platform.python_version()}
        return cls(NullModelInfo(name=name, fingerprint=fingerprint, pin=pin, versions=versions), config)

    class _NoAdapters:
        """No LoRA is ever loaded into the null model: rows record their adapters without hashes."""

        sha256: dict[str, str] = {}

        def record(self, loras) -> list[dict[str, Any]]:
            return [{"name": n, "scale": s, "sha256": None} for n, s in loras]

    loras = _NoAdapters()

    def conditioning(self, row: Row) -> dict[str, Any]:
        return {}

    def refiner_record(self, row: Row) -> dict[str, Any]:
        return {}

    def prompt_truncated_at(self, prompt: str) -> int | None:
        return None

    def scheduler_config(self, name: str) -> dict[str, Any]:
        return {"sampler": name, "null_model_version": self.config.get("version")}

    def generate(self, rows: list[Row], init_images: list | None = None) -> GeneratedBatch:
        """One batch, like ``Generator.generate``."""
        if not rows:
            return GeneratedBatch(np.zeros((0, 0, 0, 3), np.uint8), [])
        return GeneratedBatch(np.stack([draw(r.seed, r.width, r.height) for r in rows]), [None] * len(rows))


def is_null_model(folder: Path) -> bool:
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == NULL_CLASS_NAME
    except (OSError, ValueError):
        return False
