"""The torch-free contract between a loaded model and its callers (the worker, ``reproduce``):
``LoadRequest`` (what to load), ``ModelInfo`` (what was loaded), ``LoadedModel`` (what every
family's runtime implements: generate a canonical batch, give each row's generation facts,
build its samplers) and ``GeneratedBatch`` (one batch's pixels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sdbatch.data.record import NO_CONDITIONING

if TYPE_CHECKING:
    from PIL import Image

    from sdbatch.data.record import ConditioningInputs, GenerationFacts
    from sdbatch.data.row import Row
    from sdbatch.models.families import ModelTraits
    from sdbatch.models.speed import SpeedSpec


@dataclass(frozen=True)
class LoadRequest:
    """A resolved model to load (``models.runtime.load_model`` makes it) and the job's options."""

    name: str  # as the job names it
    folder: Path  # the local folder it is loaded from
    pin: str  # what the job pins it to
    fingerprint: str  # sha256 over every file of ``folder``
    traits: ModelTraits  # its family adapter and what its configs say
    device: str = "auto"
    dtype: str = "auto"
    endpoint_url: str | None = None
    loras: dict[str, str] | None = None
    compile: bool = False
    refiner: str | None = None
    refiner_pin: str | None = None
    checkpoint: Path | None = None  # a single-file checkpoint, loaded with ``folder``'s configuration
    offload: str = "none"  # model.offload: none, model (model CPU offload) or group (group offload)
    text_encoder_device: str = "same"  # model.text_encoder_device: same (the model's device) or cpu
    speed: SpeedSpec | None = None  # the job's speed profile (None: exact)
    vae: Path | None = None  # model.vae: a VAE folder loaded in place of the model's own
    embeddings: tuple[tuple[str, Path], ...] = ()  # textual-inversion embeddings: (name, file)
    prompt_syntax: str = "a1111"  # model.prompt_syntax: a1111 (emphasis, BREAK, chunks through compel) or literal
    controlnets: tuple[tuple[str, Path, str], ...] = ()  # ControlNets: (name, folder, content fingerprint)
    ip_adapter: tuple[Path, Path] | None = None  # the IP-Adapter: (weights file, image encoder folder)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str  # sha256 over every file of the folder loaded
    pin: str  # what the job pins the model to (sdbatch.models): equals fingerprint for local folders
    device: str
    dtype: str
    versions: dict[str, str]
    threads: int  # torch intra-op threads: on CPU, the reduction order and so the last bit depend on it
    family: str  # model_index.json _class_name
    refiner_name: str | None = None  # model.refiner, as the job names it
    refiner_fingerprint: str | None = None  # sha256 over every file of the refiner folder loaded
    refiner_pin: str | None = None  # what the job pins the refiner to

    @property
    def short_hash(self) -> str:
        """A1111-style 10-hex model hash."""
        return self.fingerprint[:10]


@dataclass
class GeneratedBatch:
    """One batch's images as a (rows, height, width, 3) uint8 host array, and per row either
    None or why its image is unusable (it must then not be stored as a success)."""

    pixels: np.ndarray
    errors: list[str | None]

    def images(self) -> list[Image.Image]:
        from PIL import Image

        return [Image.fromarray(p) for p in self.pixels]


class LoadedModel(Protocol):
    """One loaded model replica, whatever runs it."""

    info: ModelInfo

    def generate(self, rows: list[Row], conditioning: ConditioningInputs = NO_CONDITIONING) -> GeneratedBatch:
        """One canonical batch: all rows share ``Row.batch_key()``; ``conditioning``: its
        conditioning images, per row, of the kinds the batch takes."""
        ...

    def facts(self, row: Row) -> GenerationFacts:
        """What the record of ``row``'s image says about how it was generated."""
        ...

    def build_samplers(self) -> None:
        """Build every sampler the family takes, so one that cannot be built fails the load."""
        ...

    def recovered_from_out_of_memory(self, error: Exception) -> bool:
        """Whether ``error``, raised by ``generate``, is the device running out of memory — its cached
        memory then given back, so the batch can be generated as smaller ones; else False."""
        ...
