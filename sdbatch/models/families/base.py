"""The model-adapter interface (design.md §8.2): what one family of models is, read torch-free.

A family adapter declares what it loads (the diffusers pipelines of its text-to-image and
img2img stages, the refiner class it takes, its denoiser folder and load options), which per-row
columns it honours and what ``guidance_scale`` means for it (``guidance``), reads its traits from
the model's configs (native size, as the pipeline computes it; the CLIP text encoder's depth),
states the model-dependent row rules validation runs at preflight (``row_rules``), and gives the
runtime the per-batch pipeline arguments, the img2img extras and how its latents decode.

Nothing here imports torch: the hooks operate on the pipeline and tensor objects the runtime
(``models.runtime``) hands them, with their own methods only. A family that is not run by a
diffusers pipeline (``builtin:null``) declares another ``runtime``; ``models.runtime`` maps
each runtime to the loader that builds its ``adapter.LoadedModel``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError

if TYPE_CHECKING:
    from sdbatch.data.row import Row

#: What ``guidance_scale`` means for a family: classifier-free guidance with a negative prompt
#: (``cfg``), Qwen-Image style ``true_cfg_scale`` (``true_cfg``), a guidance embedding of a
#: distilled model without an unconditional branch (``distilled``), or nothing (``none``).
Guidance = Literal["cfg", "true_cfg", "distilled", "none"]

#: Every per-row column: what a family honours unless it says otherwise.
ALL_COLUMNS: frozenset[str] = frozenset(KNOWN_COLUMNS)


@dataclass(frozen=True)
class ModelTraits:
    """What the driver learns about a model from its configs alone."""

    family: FamilyAdapter
    native_width: int
    native_height: int
    text_encoder_layers: int | None = None  # depth of the CLIP text encoder clip_skip counts in
    size_multiple: int | None = None  # width and height must be multiples of it (VAE factor × patch size)

    def row_rules(self) -> tuple[RowRule, ...]:
        return self.family.row_rules(self)


@dataclass(frozen=True)
class RowRule:
    """A model-dependent rule on one column, run by manifest validation on every row's value
    (the job default filled in) and by the runtime on a batch's row: ``refuses`` maps an array
    of values to a mask of the refused ones."""

    column: str
    refuses: Callable[[np.ndarray], np.ndarray]
    rule: str  # what the value must be, for the error
    fix: str

    def refuses_value(self, value: Any) -> bool:
        return bool(self.refuses(np.asarray([value]))[0])

    def check_row(self, row: Row) -> None:
        """ValueError naming the row, column, value and fix when ``row`` breaks the rule."""
        value = getattr(row, self.column)
        if self.refuses_value(value):
            raise ValueError(f"row {row.id}: {self.column} {value!r}: {self.rule}. Fix: {self.fix}")


def vae_scale(read_json: JsonReader, where: str) -> int:
    """The pixels per latent of an ``AutoencoderKL``: 2 ** (levels - 1), as the pipelines compute it."""
    blocks = (read_json("vae/config.json") or {}).get("block_out_channels")
    if not blocks:
        raise FamilyError(f"model {where}: vae/config.json needs block_out_channels to know the VAE's scale; "
                          "is the folder complete?")
    return 2 ** (len(blocks) - 1)


class FamilyAdapter(ABC):
    """One model family. Subclasses declare the class attributes and implement ``native_size``."""

    name: ClassVar[str]  # short label for the README table and logs
    class_name: ClassVar[str]  # model_index.json _class_name
    runtime: ClassVar[str] = "diffusers"  # which loader of models.runtime builds it
    txt2img: ClassVar[str] = ""  # diffusers pipeline class for text-to-image
    img2img: ClassVar[str] = ""  # diffusers pipeline class for img2img, built with from_pipe (shared modules)
    refiner: ClassVar[str | None] = None  # the pipeline class of the refiner it takes (model.refiner)
    denoiser: ClassVar[str] = ""  # the component folder whose config holds sample_size
    samplers: ClassVar[tuple[str, ...]]
    load_options: ClassVar[Mapping[str, Any]] = {}  # from_pretrained arguments
    honours: ClassVar[frozenset[str]] = ALL_COLUMNS  # the per-row columns a row may set
    guidance: ClassVar[Guidance] = "cfg"
    sdpa_modules: ClassVar[tuple[str, ...]] = ()  # modules switched to PyTorch SDPA attention
    channels_last: ClassVar[bool] = False  # the denoiser runs channels_last on CUDA (UNets)
    text_encoder_counts_layers: ClassVar[bool] = False  # clip_skip counts text_encoder's layers (CLIP)

    @abstractmethod
    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        """(width, height) the family's pipeline renders by default for this model."""

    def size_multiple(self, read_json: JsonReader, where: str) -> int | None:
        """What width and height must be multiples of for this model (None: the column rules alone)."""
        return None

    def read_traits(self, read_json: JsonReader, where: str) -> ModelTraits:
        width, height = self.native_size(read_json, where)
        encoder = read_json("text_encoder/config.json") if self.text_encoder_counts_layers else None
        layers = encoder.get("num_hidden_layers") if isinstance(encoder, dict) else None
        return ModelTraits(self, width, height, int(layers) if layers else None, self.size_multiple(read_json, where))

    def row_rules(self, traits: ModelTraits) -> tuple[RowRule, ...]:
        """The rules a row's values must meet for this model: clip_skip within the CLIP text
        encoder's depth (A1111 counts the last layer as clip skip 1), and the size on the model's grid."""
        rules: list[RowRule] = []
        layers = traits.text_encoder_layers
        if layers is not None:
            deepest = layers + 1
            rules.append(RowRule("clip_skip", lambda values: values > deepest,
                                 f"clip_skip N skips the text encoder's last N-1 layers, and this model's has {layers}",
                                 f"use clip_skip <= {deepest}"))
        grid = traits.size_multiple
        if grid is not None:
            rules += [RowRule(side, lambda values: values % grid != 0,
                              f"{self.name} renders sizes that are multiples of {grid} (VAE factor × patch size)",
                              f"use a {side} that is a multiple of {grid}, such as the native "
                              f"{traits.native_width}x{traits.native_height}") for side in ("width", "height")]
        return tuple(rules)


class DiffusersFamily(FamilyAdapter):
    """A family run by a diffusers pipeline: the native size from the denoiser's
    ``sample_size`` × the VAE's scale factor, and the hooks the runtime calls per batch."""

    text_encoder_counts_layers = True

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        denoiser = read_json(f"{self.denoiser}/config.json") or {}
        sample = denoiser.get("sample_size")
        if not sample:
            raise FamilyError(f"model {where}: {self.denoiser}/config.json needs sample_size to know the native size; "
                              "is the folder complete?")
        sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
        scale = vae_scale(read_json, where)
        return int(sample_w) * scale, int(sample_h) * scale

    def size_conditioning(self, row: Row) -> dict[str, tuple[int, ...]]:
        """Extra per-row conditioning passed to the pipeline and recorded (SDXL's)."""
        return {}

    def pipeline_kwargs(self, rows: list[Row]) -> dict[str, Any]:
        """The arguments of one canonical batch's pipeline call that follow from its rows."""
        first = rows[0]
        guidance: dict[str, Any] = {
            "cfg": {"guidance_scale": first.guidance_scale, "negative_prompt": [r.negative_prompt for r in rows]},
            "true_cfg": {"true_cfg_scale": first.guidance_scale, "negative_prompt": [r.negative_prompt for r in rows]},
            "distilled": {"guidance_scale": first.guidance_scale},
            "none": {},
        }[self.guidance]
        return dict(
            prompt=[r.prompt for r in rows],
            num_inference_steps=first.steps,
            **guidance,
            # A1111 counts the last layer as clip skip 1; diffusers counts layers skipped
            **({"clip_skip": first.clip_skip - 1 or None} if self.text_encoder_counts_layers else {}),
            **self.size_conditioning(first),
        )

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        """Extra arguments of the img2img call (beyond image and strength)."""
        return {}

    def unpack_latents(self, pipe: Any, latents: Any, first: Row) -> Any:
        """The latents as the VAE takes them (batch, channels, h, w), from what the pipeline
        returns with output_type="latent" (packed token sequences for some families)."""
        return latents

    def latent_shift(self, vae: Any) -> float:
        """What is added to the unscaled latents before decoding."""
        return 0.0

    def decode_input(self, vae: Any, latents: Any) -> Any:
        """The VAE's input for ``latents`` as the pipeline leaves them (output_type="latent")."""
        return latents.to(vae.dtype) / vae.config.scaling_factor + self.latent_shift(vae)

    def vae_decode(self, vae: Any, latents: Any) -> Any:
        """The VAE's (batch, 3, height, width) output for the unpacked ``latents``."""
        return vae.decode(self.decode_input(vae, latents), return_dict=False)[0]
