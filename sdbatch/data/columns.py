"""The column table: the one definition of every per-row manifest column.

For each per-row column (design.md §3.1) a ``Column`` says its name, its Arrow type (what the
manifest builder writes and the index stores), which Arrow kinds a manifest may use for it,
its job-spec default (``spec.RowDefaults`` is built from these), whether it is part of the
batch key, its range rule and the fix to print, its ``--flag`` for ``sdbatch submit``, and its
AUTOMATIC1111 infotext label. Manifest validation, ``data.row.Row``, the spec, the CLI, the
manifest builder, the index schema, the infotext and the audit's record rebuild all derive
from ``COLUMNS``; adding a column is one entry here (and, if the pipeline must see it,
``models.runtime``).

A leaf module: pyarrow only."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sdbatch.data.controlnets import IMAGE_SEPARATOR, split_images
from sdbatch.data.controlnets import canonical as controlnet_canonical
from sdbatch.data.hires import HIRES_UPSCALER
from sdbatch.data.samplers import A1111_BY_CLASS, DEFAULT_SAMPLER, SAMPLERS, SCHEDULERS, sampler_name

#: Marks a column without a job-spec default (``id``, ``prompt``, ``seed``, ``init_image``).
NO_DEFAULT: Any = type("NoDefault", (), {"__repr__": lambda self: "NO_DEFAULT"})()


@dataclass(frozen=True)
class Range:
    """A numeric rule: ``lo <= value <= hi`` (``lo < value`` when ``lo_open``), ``hi`` a number
    or the name of a ``limits`` key; optionally a multiple of a power of two, or finite."""

    lo: float
    hi: float | str
    fix: str  # the fix for a value out of range (above it, where ``low_fix`` is given)
    lo_open: bool = False
    hi_open: bool = False
    multiple_of: int | None = None
    finite: str | None = None  # the fix for NaN/infinity; None: the column is an integer
    low_fix: str | None = None  # the fix for a value below ``lo`` (None: ``fix`` says both directions)

    def upper(self, limits: Any) -> float:
        return getattr(limits, self.hi) if isinstance(self.hi, str) else self.hi

    def text(self, name: str, limits: Any) -> str:
        hi = self.upper(limits)
        hi_text = f"{hi:,}" if isinstance(hi, int) else f"{hi:g}"
        where = f" (limits.{self.hi})" if isinstance(self.hi, str) else ""
        return f"{self.lo:g} {'<' if self.lo_open else '<='} {name} {'<' if self.hi_open else '<='} {hi_text}{where}"

    def fix_for(self, value: float) -> str:
        """The fix for ``value``, an out-of-range value: it says which way to go."""
        below = value <= self.lo if self.lo_open else value < self.lo
        return self.low_fix if below and self.low_fix else self.fix

    def accepts(self, value: float, limits: Any) -> bool:
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        high_ok = value < self.upper(limits) if self.hi_open else value <= self.upper(limits)
        on_grid = self.multiple_of is None or value % self.multiple_of == 0
        return low_ok and high_ok and on_grid and value == value  # NaN fails


@dataclass(frozen=True)
class AppliesWhen:
    """When a conditional column may be set in a row: another column is set in the same row
    (``row_column``), or the job spec sets a key (``spec_key``, dotted). Validation refuses a
    row that sets the column otherwise, with ``rule`` and ``fix``."""

    rule: str
    fix: str
    row_column: str | None = None
    spec_key: str | None = None


@dataclass(frozen=True)
class Column:
    name: str
    arrow_type: pa.DataType  # the manifest builder's type, and the index's
    kinds: frozenset[str]  # Arrow kinds a manifest may use (see manifest.report.arrow_kind)
    expected: str  # "a string column": said when the kind is wrong
    type_fix: str
    default: Any = NO_DEFAULT  # the job-spec default (RowDefaults.<name>)
    spec_bounds: dict[str, float] = field(default_factory=dict)  # pydantic Field bounds on the default
    description: str = ""
    flag: str | None = None  # the ``sdbatch submit`` option setting defaults.<name>
    batch_key: bool = False  # rows must agree on it to share one batch (design.md §4.2)
    nullable: bool = False  # Row holds None for "not applicable" (init_image, strength)
    range: Range | None = None
    #: AUTOMATIC1111 infotext: label, rank in A1111's parameter order, and the value to write
    #: for a record (None: leave the parameter out, as A1111 does)
    a1111: str | None = None
    a1111_rank: int = 0
    a1111_value: Callable[[dict[str, Any]], Any] | None = None
    #: added after the record format was fixed: the image record holds it only when it differs
    #: from its default (a nullable column's: None), so images made before it existed keep
    #: their bytes and reproduce; the job fingerprint holds its spec default only when changed
    recorded_when_set: bool = False
    #: a column the Row holds in another form than the manifest's (``loras``: parsed adapter
    #: pairs): its index type, the Row's type and default, and the conversions between the Row's
    #: value and the form the index and records store
    index_type: pa.DataType | None = None
    row: RowForm | None = None
    applies_when: AppliesWhen | None = None  # a conditional column (strength, refiner_switch)
    #: a manifest value as the Row holds it, where a value has other spellings (scheduler:
    #: AUTOMATIC1111's sampler names); None: the value as it is
    canonical: Callable[[Any], Any] | None = None
    #: a conditioning image (init_image, mask_image, control_image, ip_adapter_image): a location resolved like
    #: init_image, read by the workers' bounded loader inside the job's init-image places, its
    #: bytes' sha256 recorded
    image: bool = False
    #: an image column whose value may name several images, separated by ``IMAGE_SEPARATOR``
    #: (control_image: one per ControlNet)
    several_images: bool = False

    @property
    def python_type(self) -> type:
        return {pa.string(): str, pa.int64(): int, pa.float64(): float}[self.arrow_type]

    @property
    def spec_type(self) -> Any:
        """The type of ``RowDefaults.<name>``: a default of None (width, height) means the
        model's native size or own default, filled in at submit (``JobSpec.with_model_defaults``)."""
        return self.python_type | None if self.default is None else self.python_type

    @property
    def unset(self) -> Any:
        """The Row's value when the column does not apply or is left at its default."""
        return None if self.nullable else self.default

    @property
    def stored_type(self) -> pa.DataType:
        """The index's type of the column."""
        return self.index_type or self.arrow_type

    def coerce(self, value: Any) -> Any:
        """A stored value (index, record) as the Row holds it; None → the default
        (or None for a nullable column)."""
        if self.row is not None:
            return self.row.from_stored(value)
        if value is None:
            return None if self.nullable or self.default is NO_DEFAULT else self.default
        return self.python_type(value)

    def stored(self, value: Any) -> Any:
        """The Row's value as the index and the image records hold it."""
        return self.row.to_stored(value) if self.row is not None else value

    def image_locations(self, value: str | None) -> list[str]:
        """The images an image column's value names, in order (none for null)."""
        if value is None:
            return []
        return split_images(value) if self.several_images else [value]


@dataclass(frozen=True)
class RowForm:
    """How a Row holds a column that is not simply its manifest value (see ``Column.row``)."""

    type: Any
    default: Any
    to_stored: Callable[[Any], Any]
    from_stored: Callable[[Any], Any]


def _int(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: int(r[name]) if r.get(name) is not None else None


def _float(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: float(r[name]) if r.get(name) is not None else None


def _size(r: dict[str, Any]) -> str | None:
    w, h = r.get("width"), r.get("height")
    return f"{int(w)}x{int(h)}" if w is not None and h is not None else None


def _sampler(r: dict[str, Any]) -> str | None:
    s = r.get("scheduler")
    if s is None or s == "":
        return None
    if s in SAMPLERS:
        return SAMPLERS[s].a1111
    class_name = (r.get("scheduler_config") or {}).get("_class_name")
    return (A1111_BY_CLASS.get(class_name) if class_name else None) or str(s)


#: The index's and the record's form of a row's adapters (sha256 added by the worker).
_LORA_ENTRY = pa.struct([("name", pa.string()), ("scale", pa.float64()), ("sha256", pa.string())])


_LORA_FORM = RowForm(
    tuple, (),
    to_stored=lambda pairs: [{"name": name, "scale": scale} for name, scale in pairs],
    from_stored=lambda entries: tuple((a["name"], float(a["scale"])) for a in entries or ()),
)


def _denoising(r: dict[str, Any]) -> float | None:
    # A1111 writes the denoising strength for img2img, and for a hires-fix pass (its strength)
    if r.get("hires_scale") is not None and r.get("hires_strength") is not None:
        return float(r["hires_strength"])
    has_init = r.get("init_image") not in (None, "")
    return float(r["strength"]) if has_init and r.get("strength") is not None else None



def _scale(r: dict[str, Any]) -> str | None:
    # A1111 writes the factor as typed: "Hires upscale: 2", "Hires upscale: 1.5"
    return f"{float(r['hires_scale']):g}" if r.get("hires_scale") is not None else None


def _clip_skip(r: dict[str, Any]) -> int | None:
    # A1111 leaves "Clip skip" out at 1 (no layer skipped)
    v = r.get("clip_skip")
    return int(v) if v is not None and int(v) > 1 else None


_TEXT = frozenset({"string"})


_INT = frozenset({"int"})


_NUMBER = frozenset({"float", "int"})


def _int_fix(name: str) -> str:
    return f"write {name} as int64 (pandas nullable 'Int64' when some rows use the default)"


def _size_low_fix(side: str) -> str:
    return f"use a {side} of at least 64, a multiple of 8 (e.g. 512), or null for the model's native {side}"


COLUMNS: tuple[Column, ...] = (
    Column("id", pa.string(), frozenset({"string", "int"}), "a string or integer column",
           "write ids as strings (or integers)"),
    Column("prompt", pa.string(), _TEXT, "a string column",
           "write the prompts as strings (pandas: df['prompt'] = df['prompt'].astype(str))"),
    Column("negative_prompt", pa.string(), _TEXT, "a string column",
           "write it as strings, nulls for rows that use the job default", default=""),
    Column("seed", pa.int64(), _INT, "an integer column (int64)",
           "write seeds as int64; for rows without a seed drop the column or fill it "
           "(pandas turns ints with NaN into float64 — use the nullable dtype 'Int64')",
           a1111="Seed", a1111_rank=40, a1111_value=_int("seed")),
    Column("steps", pa.int64(), _INT, "an integer column", _int_fix("steps"), default=None,
           spec_bounds={"ge": 1}, flag="--steps", batch_key=True,
           description="Default steps for rows without a value; null = the model's own (20 for SD models, "
                       "a distilled model's few).",
           range=Range(1, "max_steps", "use fewer steps, or raise the limit: --set limits.max_steps=N",
                       low_fix="use at least 1 step"),
           a1111="Steps", a1111_rank=10, a1111_value=_int("steps")),
    Column("guidance_scale", pa.float64(), _NUMBER, "a float column", "write guidance_scale as float64",
           default=None, spec_bounds={"ge": 0}, flag="--guidance-scale", batch_key=True,
           description="null = the model's own (7.5 for SD models; what it means depends on the model: "
                       "`sdbatch spec` and --dry-run say)",
           range=Range(0, "max_guidance", "use a guidance in range (typical: 3..12), or raise limits.max_guidance",
                       finite="use a number such as 7.5, or null for the job default"),
           a1111="CFG scale", a1111_rank=30, a1111_value=_float("guidance_scale")),
    Column("width", pa.int64(), _INT, "an integer column", _int_fix("width"), default=None,
           spec_bounds={"ge": 8}, flag="--width", batch_key=True, description="null = the model's native width",
           range=Range(64, "max_width", "use a smaller width, or raise the limit: --set limits.max_width=N",
                       multiple_of=8, low_fix=_size_low_fix("width")),
           a1111="Size", a1111_rank=50, a1111_value=_size),
    Column("height", pa.int64(), _INT, "an integer column", _int_fix("height"), default=None,
           spec_bounds={"ge": 8}, flag="--height", batch_key=True, description="null = the model's native height",
           range=Range(64, "max_height", "use a smaller height, or raise the limit: --set limits.max_height=N",
                       multiple_of=8, low_fix=_size_low_fix("height"))),
    Column("scheduler", pa.string(), _TEXT, "a string column", "write scheduler names as strings, e.g. 'euler_a'",
           default=DEFAULT_SAMPLER, flag="--scheduler", batch_key=True,
           description=f"Default sampler ({DEFAULT_SAMPLER} = the model's own scheduler): {', '.join(SCHEDULERS)} "
                       "(or AUTOMATIC1111's name, e.g. 'DPM++ 2M Karras').",
           a1111="Sampler", a1111_rank=20, a1111_value=_sampler, canonical=sampler_name),
    Column("init_image", pa.string(), _TEXT, "a string column",
           "write init_image as path strings (relative to the manifest) or s3:// URIs", nullable=True, image=True),
    Column("strength", pa.float64(), _NUMBER, "a float column", "write strength as float64",
           default=None, spec_bounds={"gt": 0, "le": 1}, batch_key=True, nullable=True,
           description="used only by rows with init_image; null = the model's own: 0.75, none for an "
                       "instruction-edit model (FLUX.1 Kontext, Qwen-Image-Edit)",
           range=Range(0, 1, "use a strength such as 0.75", lo_open=True),
           a1111="Denoising strength", a1111_rank=70, a1111_value=_denoising,
           applies_when=AppliesWhen("strength is only for img2img rows: it needs init_image in the same row",
                                    "set init_image for this row, or leave strength null", row_column="init_image")),
    # AUTOMATIC1111's "Refiner switch at": the fraction of the schedule the base model runs before
    # model.refiner takes over; the Row holds None in a job without a refiner (manifest.read_rows)
    Column("refiner_switch", pa.float64(), _NUMBER, "a float column", "write refiner_switch as float64",
           default=0.8, spec_bounds={"gt": 0, "lt": 1}, flag="--refiner-switch", batch_key=True, nullable=True,
           description="AUTOMATIC1111's 'Refiner switch at': the fraction of the steps the base model runs before "
                       "model.refiner finishes them (jobs with a refiner only)",
           range=Range(0, 1, "use a switch such as 0.8 (the base runs 80% of the steps, the refiner the rest)",
                       lo_open=True, hi_open=True, finite="use a number such as 0.8, or null for the job default"),
           a1111="Refiner switch at", a1111_rank=92, a1111_value=_float("refiner_switch"), recorded_when_set=True,
           applies_when=AppliesWhen("refiner_switch is only for jobs with a refiner, and model.refiner is not set",
                                    "set model.refiner (--refiner PATH) to an SDXL refiner folder, or leave "
                                    "refiner_switch null", spec_key="model.refiner")),
    Column("clip_skip", pa.int64(), _INT, "an integer column", _int_fix("clip_skip"), default=1,
           spec_bounds={"ge": 1, "le": 12}, flag="--clip-skip", batch_key=True,
           description="AUTOMATIC1111's Clip skip: 1 = the text encoder's last layer (the default), "
                       "2 = its penultimate layer, ...",
           range=Range(1, 12, "use a clip skip in 1..12 (1 = the last layer; 2 is common for anime models)"),
           a1111="Clip skip", a1111_rank=80, a1111_value=_clip_skip, recorded_when_set=True),
    # the row's adapters: this column and the prompt's <lora:NAME:SCALE> tags (lora.row_loras);
    # no single A1111 label: the infotext writes the tags after the prompt and "Lora hashes"
    Column("loras", pa.string(), _TEXT, "a string column",
           "write adapters as 'NAME:SCALE[,NAME:SCALE…]' strings, null for none", batch_key=True,
           index_type=pa.list_(_LORA_ENTRY), row=_LORA_FORM),
    # inpainting (issue 26): the area of init_image to repaint, white = repaint (as diffusers reads it)
    Column("mask_image", pa.string(), _TEXT, "a string column",
           "write mask_image as path strings (relative to the manifest) or s3:// URIs", nullable=True, image=True,
           recorded_when_set=True,
           applies_when=AppliesWhen("mask_image is only for inpainting rows: it needs init_image (the image to "
                                    "repaint) in the same row", "set init_image for this row, or leave mask_image null",
                                    row_column="init_image")),
    # AUTOMATIC1111's hires fix (data.hires): a second img2img pass at width×height × hires_scale
    Column("hires_scale", pa.float64(), _NUMBER, "a float column", "write hires_scale as float64",
           default=None, spec_bounds={"gt": 1, "le": 4}, flag="--hires-scale", batch_key=True, nullable=True,
           description="AUTOMATIC1111's hires fix: upscale each image by this factor (its latents, A1111's "
                       f"'{HIRES_UPSCALER}' upscaler) and denoise it again; null = no second pass (SD 1.x/2.x, SDXL)",
           range=Range(1, 4, "use an upscale factor such as 2 (1 < hires_scale <= 4)", lo_open=True,
                       finite="use a number such as 2, or null for no hires-fix pass"),
           a1111="Hires upscale", a1111_rank=71, a1111_value=_scale, recorded_when_set=True),
    Column("hires_strength", pa.float64(), _NUMBER, "a float column", "write hires_strength as float64",
           default=0.7, spec_bounds={"gt": 0, "le": 1}, flag="--hires-strength", batch_key=True, nullable=True,
           description="the denoising strength of the hires-fix pass (A1111's 'Denoising strength' with hires fix)",
           range=Range(0, 1, "use a strength such as 0.5", lo_open=True,
                       finite="use a number such as 0.5, or null for the job default"),
           recorded_when_set=True,  # its infotext label is strength's "Denoising strength" (_denoising)
           applies_when=AppliesWhen("hires_strength is only for rows with a hires-fix pass: it needs hires_scale",
                                    "set hires_scale for this row (or defaults.hires_scale), or leave hires_strength null",
                                    row_column="hires_scale")),
    Column("hires_steps", pa.int64(), _INT, "an integer column", _int_fix("hires_steps"), default=None,
           spec_bounds={"ge": 1}, flag="--hires-steps", batch_key=True, nullable=True,
           description="steps of the hires-fix pass (it runs int(hires_steps × hires_strength) of them, as A1111); "
                       "null = the row's steps",
           range=Range(1, "max_steps", "use fewer steps, or raise the limit: --set limits.max_steps=N",
                       low_fix="use at least 1 step"),
           a1111="Hires steps", a1111_rank=72, a1111_value=_int("hires_steps"), recorded_when_set=True,
           applies_when=AppliesWhen("hires_steps is only for rows with a hires-fix pass: it needs hires_scale",
                                    "set hires_scale for this row (or defaults.hires_scale), or leave hires_steps null",
                                    row_column="hires_scale")),
    # the row's ControlNets (data.controlnets), in the order of its control images; the infotext
    # writes A1111's "ControlNet N" entries from the record's ``controlnets``
    Column("controlnet", pa.string(), _TEXT, "a string column",
           "write ControlNets as 'NAME:SCALE[,NAME:SCALE…]' strings, null for none", batch_key=True, nullable=True,
           recorded_when_set=True, canonical=controlnet_canonical),
    Column("control_image", pa.string(), _TEXT, "a string column",
           f"write control_image as path strings (relative to the manifest) or s3:// URIs, several separated by "
           f"'{IMAGE_SEPARATOR}'", nullable=True, recorded_when_set=True, image=True, several_images=True,
           applies_when=AppliesWhen("control_image is only for ControlNet rows: it needs controlnet in the same row",
                                    "name the row's ControlNets in its controlnet column, or leave control_image null",
                                    row_column="controlnet")),
    # IP-Adapter (issue 26): the row's reference image, read by the job's declared ``ip_adapter``
    # (its image encoder), and how strongly it conditions the image; a batch runs at one scale
    Column("ip_adapter_image", pa.string(), _TEXT, "a string column",
           "write ip_adapter_image as path strings (relative to the manifest) or s3:// URIs", nullable=True,
           recorded_when_set=True, image=True,
           applies_when=AppliesWhen("ip_adapter_image is only for jobs with an IP-Adapter, and ip_adapter is not set",
                                    "declare the adapter in the spec (ip_adapter: {weights: FILE.safetensors, "
                                    "image_encoder: FOLDER}), or leave ip_adapter_image null", spec_key="ip_adapter")),
    Column("ip_adapter_scale", pa.float64(), _NUMBER, "a float column", "write ip_adapter_scale as float64",
           default=1.0, spec_bounds={"ge": 0, "le": 2}, flag="--ip-adapter-scale", batch_key=True, nullable=True,
           description="how strongly a row's ip_adapter_image conditions its image (0 = not at all, as without "
                       "the adapter); rows with a reference image only",
           range=Range(0, 2, "use a scale in 0..2 (1 is the adapter's full strength; 0.5-0.8 keeps more of the prompt)",
                       finite="use a number such as 0.6, or null for the job default"),
           recorded_when_set=True,
           applies_when=AppliesWhen("ip_adapter_scale is only for rows with a reference image: it needs ip_adapter_image",
                                    "set ip_adapter_image for this row, or leave ip_adapter_scale null",
                                    row_column="ip_adapter_image")),
)


COLUMN: dict[str, Column] = {c.name: c for c in COLUMNS}


#: The per-row columns of design.md §3.1. Every other manifest column is a passthrough column.
KNOWN_COLUMNS: tuple[str, ...] = tuple(COLUMN)


#: The columns a row may set only when their ``applies_when`` holds.
CONDITIONAL: tuple[Column, ...] = tuple(c for c in COLUMNS if c.applies_when is not None)


#: The conditioning-image columns (``Column.image``), in table order.
IMAGE_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.image)


#: The columns that have a job-spec default (the fields of ``spec.RowDefaults``).
DEFAULTED: tuple[Column, ...] = tuple(c for c in COLUMNS if c.default is not NO_DEFAULT)


#: The columns rows must agree on to share a batch (with img2img-or-not).
BATCH_KEY: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.batch_key)


def arrow_types() -> dict[str, pa.DataType]:
    """The manifest's type of each column."""
    return {c.name: c.arrow_type for c in COLUMNS}


def record_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """A row's parameters as an image record holds them (see ``Column.recorded_when_set``)."""
    return {k: v for k, v in parameters.items()
            if not (k in COLUMN and COLUMN[k].recorded_when_set and v == COLUMN[k].unset)}


def fingerprint_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The spec defaults as the job fingerprint hashes them: a column added later counts only
    when set, so a job started before it existed still resumes."""
    return {k: v for k, v in defaults.items()
            if not (k in COLUMN and COLUMN[k].recorded_when_set and v == COLUMN[k].default)}


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to a misspelled ``name`` (``widht`` → ``width``), if any is close."""
    close = difflib.get_close_matches(name.lower().strip(), list(choices), n=1, cutoff=0.75)
    return close[0] if close else None
