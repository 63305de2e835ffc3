"""The model-adapter interface (design.md §8.2): what one family of models is, read torch-free.

A family adapter declares what it loads (the diffusers pipelines of its text-to-image and
img2img stages, the refiner class it takes, its denoiser folder and load options), which per-row
columns it honours, reads its traits from the model's configs (``ModelTraits``: native size, as
the pipeline computes it; the size grid, patch × VAE factor; the CLIP text encoder's depth; what
``guidance_scale`` means for this model — a distilled variant's differs from its family's —, the
model's own defaults for steps and guidance, the text encoder's ``max_sequence_length``),
states the model-dependent row rules validation runs at preflight (``row_rules``: a negative
prompt without an unconditional branch, a guidance the model does not use, clip_skip without a
CLIP encoder, a size off its grid), and gives the runtime the per-batch pipeline arguments, the
img2img extras and how its latents decode.

Nothing here imports torch: the hooks operate on the pipeline and tensor objects the runtime
(``models.runtime``) hands them, with their own methods only. A family that is not run by a
diffusers pipeline (``builtin:null``) declares another ``runtime``; ``models.runtime`` maps
each runtime to the loader that builds its ``adapter.LoadedModel``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError

if TYPE_CHECKING:
    from sdbatch.data.row import Row

#: What ``guidance_scale`` means for a model: classifier-free guidance with a negative prompt
#: (``cfg``), Qwen-Image style ``true_cfg_scale`` (``true_cfg``), a guidance embedding of a
#: distilled model without an unconditional branch (``distilled``), or nothing (``none``).
Guidance = Literal["cfg", "true_cfg", "distilled", "none"]
#: which hidden state of a CLIP text encoder a weighted prompt reads (``FamilyAdapter.weighted_prompts``):
#: the layer clip_skip picks through the final layer norm (SD 1.x/2.x), or the penultimate layer
#: (clip_skip deeper) without it (SDXL, SD3)
PromptWeighting = Literal["normalized", "penultimate"]

#: What each guidance kind makes of ``guidance_scale`` and ``negative_prompt``, for ``--dry-run``,
#: ``sdbatch spec`` and the README.
GUIDANCE_MEANING: dict[str, str] = {
    "cfg": "guidance_scale is classifier-free guidance against negative_prompt",
    "true_cfg": "guidance_scale is true CFG (true_cfg_scale) against negative_prompt; 1 = off",
    "distilled": "guidance_scale is the distilled guidance embedding (one pass, no negative_prompt)",
    "none": "guidance_scale is unused (a guidance-free distilled model: leave it at 0, no negative_prompt)",
}

#: The per-row parameters a model may give its own default for (``ModelTraits.defaults``): left
#: null in the spec, they take the model's (a distilled model's few steps), like the native size.
MODEL_DEFAULTED = ("steps", "guidance_scale")

#: The steps and guidance_scale of a model that declares none of its own (the SD families').
DEFAULT_PARAMETERS: Mapping[str, Any] = {"steps": 20, "guidance_scale": 7.5}

#: The img2img strength a spec's null stands for (``ModelTraits.strength``), A1111's default
#: denoising strength; an instruction-edit model (``FamilyAdapter.edits``) has none.
IMG2IMG_STRENGTH = 0.75

#: Every per-row column.
ALL_COLUMNS: frozenset[str] = frozenset(KNOWN_COLUMNS)

#: The hires-fix pass, the inpainting mask and IP-Adapter rows (issue 26): sdbatch runs them with
#: the SD families' pipelines only (SD 1.x/2.x, SDXL), so a family honours them only where it says so.
SD_ONLY_COLUMNS: frozenset[str] = frozenset({"hires_scale", "hires_strength", "hires_steps", "mask_image",
                                             "ip_adapter_image", "ip_adapter_scale"})

#: What a family honours unless it says otherwise.
COMMON_COLUMNS: frozenset[str] = ALL_COLUMNS - SD_ONLY_COLUMNS


@dataclass(frozen=True)
class ModelTraits:
    """What the driver learns about a model from its configs alone."""

    family: FamilyAdapter
    native_width: int
    native_height: int
    text_encoder_layers: int | None = None  # depth of the CLIP text encoder clip_skip counts in
    guidance: Guidance | None = None  # what guidance_scale means for this model (None: its family's)
    #: the model's own steps and guidance_scale, for a spec that leaves them null (MODEL_DEFAULTED)
    defaults: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    max_sequence_length: int | None = None  # tokens the T5/LLM text encoder reads (passed, recorded)
    size_multiple: int = 8  # width and height are multiples of this: patch size × VAE factor
    variant: str | None = None  # the variant its configs show (FLUX.1 "schnell"), for messages

    def __post_init__(self) -> None:
        if self.guidance is None:
            object.__setattr__(self, "guidance", self.family.guidance)

    def row_rules(self) -> tuple[RowRule, ...]:
        return self.family.row_rules(self)

    def rules_for_rows(self) -> tuple[RowRule, ...]:
        """The row rules a row's own values are checked by (manifest validation per row, the
        runtime per batch): those on a column the family honours. A rule on any other column
        checks the job default alone, since a row setting that column is refused by ``honours``;
        so a row an older sdbatch recorded with it (an edit row's strength 0.75) still runs."""
        return tuple(rule for rule in self.row_rules() if rule.column in self.family.honours)

    @property
    def strength(self) -> float | None:
        """The img2img strength a spec's null ``defaults.strength`` stands for: none for an
        instruction-edit model, whose source image conditions every step."""
        return None if self.family.edits else IMG2IMG_STRENGTH

    @property
    def unconditional_above(self) -> float | None:
        """The guidance_scale above which the pipeline runs the unconditional branch the negative
        prompt feeds (its ``do_classifier_free_guidance``); None: it has none at any guidance."""
        return self.family.unconditional_above if self.guidance in ("cfg", "true_cfg") else None

    @property
    def label(self) -> str:
        return f"{self.family.name}{f' [{self.variant}]' if self.variant else ''} ({self.family.class_name})"

    def recorded(self) -> dict[str, Any]:
        """What the parameters mean for this model, as each image record holds it (empty for
        classifier-free guidance without a sequence limit, so older families' records keep
        their bytes)."""
        facts: dict[str, Any] = {}
        if self.guidance != "cfg":
            facts["guidance"] = self.guidance
        if self.max_sequence_length is not None:
            facts["max_sequence_length"] = self.max_sequence_length
        if self.variant:
            facts["variant"] = self.variant
        return facts

    def describe(self) -> list[str]:
        """Lines saying the family, native size, defaults and what each parameter means for
        this model (``--dry-run``, ``sdbatch spec``)."""
        d = self.defaults
        lines = [f"{self.label}: native size {self.native_width}x{self.native_height}, sizes a multiple of "
                 f"{math.lcm(self.size_multiple, 8)}; default steps {d['steps']}, guidance_scale {d['guidance_scale']:g}",
                 *self.family.parameter_meaning(self)]
        if self.max_sequence_length is not None:
            lines.append(f"prompts are read up to {self.max_sequence_length} tokens (max_sequence_length); "
                         "prompt_truncated_at records where a longer one is cut")
        if not self.family.takes_clip_skip:
            lines.append("clip_skip is not used (leave it at 1)")
        if self.family.edits:
            lines.append("every row edits its init_image as its prompt says; strength is not used")
        elif "init_image" in self.family.honours:
            lines.append(f"img2img rows (init_image) default to strength {IMG2IMG_STRENGTH:g}")
        return lines


@dataclass(frozen=True)
class RowRule:
    """A model-dependent rule on one column (or on two together: ``paired``), run by manifest
    validation on every row's value (the job default filled in) and by the runtime on each row of
    a batch: ``refuses`` maps an array of values (and one of the paired column's) to a mask of
    the refused ones."""

    column: str
    refuses: Callable[..., np.ndarray]
    rule: str  # what the value must be, for the error
    fix: str
    null_as: Any = 0  # what a null value is checked as (a string column's: "")
    paired: str | None = None  # the second column whose value the rule reads (guidance_scale)
    #: the fix for a job default it refuses, where no other value would do (None: set another value)
    default_fix: str | None = None

    def refuses_value(self, value: Any, paired_value: Any = None) -> bool:
        values = [np.asarray([self.null_as if value is None else value])]
        if self.paired is not None:
            values.append(np.asarray([paired_value]))
        return bool(self.refuses(*values)[0])

    def check_row(self, row: Row) -> None:
        """ValueError naming the row, column(s), value(s) and fix when ``row`` breaks the rule."""
        value = getattr(row, self.column)
        paired = getattr(row, self.paired) if self.paired is not None else None
        if self.refuses_value(value, paired):
            given = f" with {self.paired} {paired!r}" if self.paired is not None else ""
            raise ValueError(f"row {row.id}: {self.column} {value!r}{given}: {self.rule}. Fix: {self.fix}")


class FamilyAdapter(ABC):
    """One model family. Subclasses declare the class attributes and implement ``native_size``."""

    name: ClassVar[str]  # short label for the README table and logs
    class_name: ClassVar[str]  # model_index.json _class_name
    runtime: ClassVar[str] = "diffusers"  # which loader of models.runtime builds it
    txt2img: ClassVar[str] = ""  # diffusers pipeline class for text-to-image
    img2img: ClassVar[str] = ""  # diffusers pipeline class for img2img, built with from_pipe (shared modules)
    inpaint: ClassVar[str] = ""  # diffusers pipeline class for inpainting (mask_image), built with from_pipe
    refiner: ClassVar[str | None] = None  # the pipeline class of the refiner it takes (model.refiner)
    denoiser: ClassVar[str] = ""  # the component folder whose config holds sample_size
    samplers: ClassVar[tuple[str, ...]]
    load_options: ClassVar[Mapping[str, Any]] = {}  # from_pretrained arguments
    #: components the runtime loads itself from their subfolder with this transformers class, in
    #: place of the class model_index.json names (FLUX.2 [dev]'s tokenizer: see flux2.Flux2Dev)
    component_classes: ClassVar[Mapping[str, str]] = {}
    honours: ClassVar[frozenset[str]] = COMMON_COLUMNS  # the per-row columns a row may set
    guidance: ClassVar[Guidance] = "cfg"
    #: with guidance "cfg"/"true_cfg": the guidance_scale above which the pipeline runs its
    #: unconditional branch (diffusers' ``do_classifier_free_guidance``: ``guidance_scale > 1``)
    unconditional_above: ClassVar[float] = 1.0
    sdpa_modules: ClassVar[tuple[str, ...]] = ()  # modules switched to PyTorch SDPA attention
    channels_last: ClassVar[bool] = False  # the denoiser runs channels_last on CUDA (UNets)
    text_encoder_counts_layers: ClassVar[bool] = False  # clip_skip counts text_encoder's layers (CLIP)
    takes_clip_skip: ClassVar[bool] = True  # False: the pipeline has no clip_skip (no CLIP prompt encoder)
    takes_embeddings: ClassVar[bool] = False  # textual-inversion embeddings load into its CLIP encoders
    #: how its CLIP text encoders' output is read when a prompt is weighted through compel
    #: (``models.prompt_weights``: A1111 emphasis, BREAK, 75-token chunks); None: prompts are
    #: read literally (T5/LLM encoders), validation warns about the syntax
    weighted_prompts: ClassVar[PromptWeighting | None] = None
    #: an instruction-edit model (FLUX.1 Kontext, Qwen-Image-Edit): every row edits its ``init_image``
    #: (required: validation and the runtime refuse a row without one) through the ``img2img``
    #: pipeline, with ``img2img_kwargs`` (no strength: the source image conditions the whole run;
    #: its spec default is none, ``ModelTraits.strength``, and a set one is refused by ``row_rules``)
    edits: ClassVar[bool] = False
    #: the diffusers pipeline class its ControlNet rows run (built with from_pipe: shared modules);
    #: "" = the family takes no ControlNet
    controlnet: ClassVar[str] = ""
    #: the diffusers model class of its ControlNets (a folder's config.json ``_class_name``)
    controlnet_model: ClassVar[str] = "ControlNetModel"
    #: the ControlNet pipeline's control-image argument and how it takes several ControlNets'
    #: images: SD's ``image`` nested per row, FLUX.1's and SD3's ``control_image`` per ControlNet
    controlnet_image: ClassVar[tuple[str, Literal["per_row", "per_controlnet"]]] = ("image", "per_row")
    #: it takes an IP-Adapter (diffusers' ``load_ip_adapter`` on its UNet; ``ip_adapter_image`` rows)
    ip_adapter: ClassVar[bool] = False
    #: the denoiser config keys a ControlNet's config.json must equal to fit the model: its residuals
    #: are added to the denoiser's blocks, and it reads the same latents and text embeddings
    controlnet_fit: ClassVar[tuple[str, ...]] = ("in_channels", "block_out_channels", "layers_per_block",
                                                 "cross_attention_dim", "addition_embed_type",
                                                 "projection_class_embeddings_input_dim")

    @abstractmethod
    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        """(width, height) the family's pipeline renders by default for this model."""

    def parameter_meaning(self, traits: ModelTraits) -> list[str]:
        """What guidance_scale (and the other parameters) mean for this model, in words."""
        return [GUIDANCE_MEANING[str(traits.guidance)]]

    def model_guidance(self, read_json: JsonReader) -> Guidance:
        """What guidance_scale means for this model (a distilled variant may differ from its
        family's ``guidance``)."""
        return self.guidance

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        """This model's own steps and guidance_scale (MODEL_DEFAULTED), from its configs."""
        return dict(DEFAULT_PARAMETERS)

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        """Tokens the pipeline's T5/LLM text encoder reads (None: the family passes none)."""
        return None

    def size_multiple(self, read_json: JsonReader) -> int:
        """What width and height must be a multiple of (patch size × VAE factor)."""
        return 8

    def variant(self, read_json: JsonReader) -> str | None:
        """The variant the configs show (``schnell``), for messages and the record."""
        return None

    def read_traits(self, read_json: JsonReader, where: str) -> ModelTraits:
        width, height = self.native_size(read_json, where)
        encoder = read_json("text_encoder/config.json") if self.text_encoder_counts_layers else None
        layers = encoder.get("num_hidden_layers") if isinstance(encoder, dict) else None
        guidance = self.model_guidance(read_json)
        return ModelTraits(self, width, height, int(layers) if layers else None, guidance=guidance,
                           defaults=self.model_defaults(read_json, guidance),
                           max_sequence_length=self.max_sequence_length(read_json),
                           size_multiple=self.size_multiple(read_json), variant=self.variant(read_json))

    def row_rules(self, traits: ModelTraits) -> tuple[RowRule, ...]:
        """The rules a row's values must meet for this model: clip_skip within the CLIP text
        encoder's depth (A1111 counts the last layer as clip skip 1), or none without one; no
        negative prompt without an unconditional branch, or with a guidance_scale that turns it
        off; no guidance a guidance-free model would ignore; sizes on the model's grid."""
        rules: list[RowRule] = []
        who = traits.label
        layers = traits.text_encoder_layers
        if layers is not None:
            deepest = layers + 1
            rules.append(RowRule("clip_skip", lambda values: values > deepest,
                                 f"clip_skip N skips the text encoder's last N-1 layers, and this model's has {layers}",
                                 f"use clip_skip <= {deepest}"))
        if not self.takes_clip_skip:
            rules.append(RowRule("clip_skip", lambda values: values != 1,
                                 f"{who} takes no clip_skip (its prompt encoder is not a CLIP whose layers it skips)",
                                 "leave clip_skip null (1)"))
        above = traits.unconditional_above
        if above is None or "negative_prompt" not in self.honours:
            why = "has no unconditional branch" if above is None else "takes no negative prompt"
            rules.append(RowRule("negative_prompt", lambda values: values != "",
                                 f"{who} {why}, so a negative prompt would be ignored",
                                 "leave negative_prompt null or empty for this model", null_as=""))
        else:  # a negative prompt feeds the unconditional branch, which low guidance turns off
            rules.append(RowRule("negative_prompt", lambda negatives, scales: (negatives != "") & (scales <= above),
                                 f"{who} runs no unconditional branch at guidance_scale <= {above:g}, "
                                 "so the negative prompt would be ignored",
                                 f"raise guidance_scale above {above:g}, or leave the negative prompt empty "
                                 "(a row's '' overrides the job default)", null_as="", paired="guidance_scale"))
        if traits.guidance == "none":
            rules.append(RowRule("guidance_scale", lambda values: values != 0,
                                 f"{who} is guidance-distilled and uses no guidance_scale",
                                 "leave guidance_scale null (the model's 0)"))
        if self.edits:  # the job default's, which is none unless set (a row's is refused by ``honours``)
            rules.append(RowRule("strength", lambda values: ~np.isnan(values),
                                 f"{who} edits take no strength (the source image conditions every step)",
                                 "leave strength null for this model", null_as=np.nan,
                                 default_fix="leave defaults.strength null for this model: remove it from the spec "
                                             "(or --set defaults.strength=null)"))
        multiple = traits.size_multiple
        if multiple > 8 or 8 % multiple:  # 8 is the column rule every model has
            for side in ("width", "height"):
                rules.append(RowRule(side, lambda values: values % multiple != 0,
                                     f"{who} renders {side}s that are a multiple of {multiple} (patch size × VAE factor)",
                                     f"use a multiple of {multiple}, or null for the native {side}"))
        return tuple(rules)


class DiffusersFamily(FamilyAdapter):
    """A family run by a diffusers pipeline: the native size from the denoiser's
    ``sample_size`` (or the pipeline's own ``default_sample_size``) × the VAE's scale factor,
    and the hooks the runtime calls per batch."""

    text_encoder_counts_layers = True
    #: the pipeline's fixed default_sample_size (FLUX's 128), where it does not read the denoiser's
    default_sample_size: ClassVar[int | None] = None
    #: latent pixels per token side the pipeline packs beyond the denoiser's patch_size (FLUX's 2×2)
    packing: ClassVar[int] = 1
    #: the img2img pipeline renders at its native size unless given the row's (SD3's, FLUX's)
    img2img_size: ClassVar[bool] = False

    def vae_scale_factor(self, read_json: JsonReader, where: str) -> int:
        """Pixels per latent pixel, as the pipeline computes it (from the VAE's blocks)."""
        blocks = (read_json("vae/config.json") or {}).get("block_out_channels")
        if not blocks:
            raise FamilyError(f"model {where}: vae/config.json needs block_out_channels to know the native size; "
                              "is the folder complete?")
        return int(2 ** (len(blocks) - 1))

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        sample = self.default_sample_size or (read_json(f"{self.denoiser}/config.json") or {}).get("sample_size")
        if not sample:
            raise FamilyError(
                f"model {where}: {self.denoiser}/config.json needs sample_size to know the native size; "
                "is the folder complete?"
            )
        sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
        scale = self.vae_scale_factor(read_json, where)
        return int(sample_w) * scale, int(sample_h) * scale

    def size_multiple(self, read_json: JsonReader) -> int:
        patch = (read_json(f"{self.denoiser}/config.json") or {}).get("patch_size") or 1
        try:
            scale = self.vae_scale_factor(read_json, "")
        except FamilyError:
            return 8  # an incomplete folder: native_size says so
        return scale * int(patch) * self.packing

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        """The tokenizers of the encoders whose token sequence the denoiser reads, each with the
        tokens its encoder reads (prompt_truncated_at is where the first of them stops): by
        default CLIP's ``tokenizer`` and ``tokenizer_2``, at their model_max_length."""
        tokenizers = (getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2"))
        return [(t, int(t.model_max_length)) for t in tokenizers if t is not None]

    def size_conditioning(self, row: Row) -> dict[str, tuple[int, ...]]:
        """Extra per-row conditioning passed to the pipeline and recorded (SDXL's)."""
        return {}

    def guidance_kwargs(self, rows: list[Row], guidance: Guidance) -> dict[str, Any]:
        """The pipeline arguments that carry a batch's guidance_scale (and negative prompts), by
        what guidance means for the model; a family whose pipeline names them otherwise overrides."""
        first = rows[0]
        return {
            "cfg": {"guidance_scale": first.guidance_scale, "negative_prompt": [r.negative_prompt for r in rows]},
            "true_cfg": {"true_cfg_scale": first.guidance_scale, "negative_prompt": [r.negative_prompt for r in rows]},
            "distilled": {"guidance_scale": first.guidance_scale},
            "none": {},
        }[guidance]

    def pipeline_kwargs(self, rows: list[Row], traits: ModelTraits | None = None) -> dict[str, Any]:
        """The arguments of one canonical batch's pipeline call that follow from its rows (and
        the model's traits: its guidance kind and max_sequence_length)."""
        first = rows[0]
        guidance = (traits.guidance if traits is not None else None) or self.guidance
        limit = traits.max_sequence_length if traits is not None else None
        return dict(
            prompt=[r.prompt for r in rows],
            num_inference_steps=first.steps,
            **self.guidance_kwargs(rows, guidance),
            # A1111 counts the last layer as clip skip 1; diffusers counts layers skipped
            **({"clip_skip": first.clip_skip - 1 or None} if self.text_encoder_counts_layers else {}),
            **({"max_sequence_length": limit} if limit is not None else {}),
            **self.size_conditioning(first),
        )

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        """The img2img call's arguments beyond the image: the row's strength, and its size for
        an img2img pipeline that renders at its native size unless told (``img2img_size``)."""
        return {"strength": first.strength, **({"height": first.height, "width": first.width} if self.img2img_size else {})}

    def unpack_latents(self, pipe: Any, latents: Any, first: Row) -> Any:
        """The latents as the VAE reads them, from those the pipeline returns with
        output_type="latent" (FLUX-style pipelines return them packed into tokens)."""
        return latents

    def latent_shift(self, vae: Any) -> float:
        """What is added to the unscaled latents before decoding: the VAE's shift_factor
        (SD3's and FLUX's VAEs have one; SD's none)."""
        return getattr(vae.config, "shift_factor", None) or 0.0

    def decode_input(self, vae: Any, latents: Any) -> Any:
        """The VAE's input for ``latents`` as the pipeline leaves them (output_type="latent")."""
        return latents.to(vae.dtype) / vae.config.scaling_factor + self.latent_shift(vae)

    def vae_decode(self, vae: Any, latents: Any) -> Any:
        """The VAE's (batch, 3, height, width) output for the unpacked ``latents``."""
        return vae.decode(self.decode_input(vae, latents), return_dict=False)[0]
