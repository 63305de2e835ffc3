"""``builtin:null``: a "model" that draws each row's picture from its seed and size at almost
no cost, for measuring the machinery (batching, encode, hash, store, commit) and for scale
tests — not for users' images.

The picture is smooth colour gradients and waves plus per-pixel noise, so its PNGs cost what
real images cost to encode (a 512² PNG at level 1 is about 520 KB). It depends on the row's
seed, width and height only — never on its batch-mates, prompt or sampler — and is drawn with
numpy alone (no torch). ``NullFamily`` is its family adapter (a fixed native size, any sampler,
no row rules) and ``NullModel`` its ``adapter.LoadedModel``, so the worker, ``reproduce`` and
``verify`` run it like any model; ``model_index.json`` in ``models/null/`` names it (and its
``version``, part of the model fingerprint, changes whenever the drawing does).
"""

from __future__ import annotations

import json
import platform
from typing import Any

import numpy as np

from sdbatch.data.record import NO_CONDITIONING, ConditioningInputs, GenerationFacts
from sdbatch.data.row import Row
from sdbatch.data.samplers import SCHEDULERS
from sdbatch.models.adapter import GeneratedBatch, LoadRequest, ModelInfo
from sdbatch.models.builtin import NULL_CLASS_NAME
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import FamilyAdapter, ModelTraits, RowRule

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


class NullFamily(FamilyAdapter):
    """``builtin:null``: any sampler, no weights; rows take every column, which is recorded
    (the drawing depends on seed and size alone)."""

    name = "null (machinery)"
    class_name = NULL_CLASS_NAME
    runtime = "numpy"
    samplers = SCHEDULERS
    guidance = "none"
    size = 64

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        return self.size, self.size

    def row_rules(self, traits: ModelTraits) -> tuple[RowRule, ...]:
        return ()  # every column is recorded; the drawing reads seed and size alone

    def parameter_meaning(self, traits: ModelTraits) -> list[str]:
        return ["the picture depends on seed and size alone; every other parameter is only recorded"]


class NullModel:
    """Draws each row with ``draw``; img2img rows ignore their init image (it is still read,
    hashed and recorded by the worker, so that path is measured too). No LoRA is ever loaded:
    rows record their adapters without hashes."""

    def __init__(self, info: ModelInfo, config: dict[str, Any]):
        self.info = info
        self.config = config

    @classmethod
    def load(cls, request: LoadRequest) -> NullModel:
        config = json.loads((request.folder / "model_index.json").read_text())
        versions = {"numpy": np.__version__, "python": platform.python_version()}
        info = ModelInfo(name=request.name, fingerprint=request.fingerprint, pin=request.pin, device="cpu",
                         dtype="uint8", versions=versions, threads=1, family=request.traits.family.class_name)
        return cls(info, config)

    def build_samplers(self) -> None:
        """Nothing to build: a sampler is only recorded."""

    def recovered_from_out_of_memory(self, error: Exception) -> bool:
        """Never: it holds no device memory."""
        return False

    def facts(self, row: Row) -> GenerationFacts:
        info = self.info
        return GenerationFacts(
            model_name=info.name, model_family=info.family, model_fingerprint=info.fingerprint, device=info.device,
            dtype=info.dtype, versions=dict(info.versions), torch_threads=info.threads,
            scheduler_config={"sampler": row.scheduler, "null_model_version": self.config.get("version")},
            size_conditioning={}, loras=tuple({"name": n, "scale": s, "sha256": None} for n, s in row.loras),
            prompt_truncated_at=None,
        )

    def generate(self, rows: list[Row], conditioning: ConditioningInputs = NO_CONDITIONING) -> GeneratedBatch:
        """One batch, like every ``LoadedModel``."""
        if not rows:
            return GeneratedBatch(np.zeros((0, 0, 0, 3), np.uint8), [])
        return GeneratedBatch(np.stack([draw(r.seed, r.width, r.height) for r in rows]), [None] * len(rows))
