"""The per-column rules of validation, run on one record batch at a time, and the checks of the
job's defaults and passthrough columns."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.data.aliases import foreign
from sdbatch.data.columns import DEFAULTED, KNOWN_COLUMNS, Column, suggest
from sdbatch.data.controlnets import IMAGE_SEPARATOR, ControlNetError, row_controlnets
from sdbatch.data.hires import HIRES_MULTIPLE
from sdbatch.data.index import RESERVED_COLUMNS
from sdbatch.data.loras import LoraError, row_loras
from sdbatch.data.prompt_syntax import (
    ANY_FORM,
    LITERAL_READER,
    PROMPT_SYNTAX,
    REFUSED_FIX,
    REFUSED_RULE,
    UNKNOWN_READER,
    WARNING,
)
from sdbatch.data.row import default_row_id
from sdbatch.manifest.reader import plain_array
from sdbatch.manifest.report import RowIssue, arrow_kind, repr_value, value_at
from sdbatch.manifest.sources import Manifest
from sdbatch.spec import JobSpec

if TYPE_CHECKING:
    from sdbatch.models.families import FamilyAdapter, RowRule


class ValueCounts:
    """Value counts for the summary, capped in size."""

    CAP = 10_000

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        keys, cnts = np.unique(values, return_counts=True)
        for k, c in zip(keys.tolist(), cnts.tolist()):
            if k in self.counts or len(self.counts) < self.CAP:
                self.counts[k] = self.counts.get(k, 0) + c


class IssueCollector:
    """Counts every issue; keeps the first ``limit`` by (row, column) order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: list[RowIssue] = []
        self.count = 0
        self._col_order = {c: i for i, c in enumerate(KNOWN_COLUMNS)}

    def full_before(self, row: int) -> bool:
        return len(self.kept) >= self.limit and self.kept[-1].row < row

    def _sort(self) -> None:
        self.kept.sort(key=lambda x: (x.row, self._col_order.get(x.column, 99)))
        del self.kept[self.limit :]

    def add(self, issue: RowIssue) -> None:
        self.count += 1
        self.kept.append(issue)
        self._sort()


class BatchUnderCheck:
    """One record batch under validation: its columns, decoded, and issue bookkeeping."""

    def __init__(self, rb: pa.RecordBatch, base: int, skip: set[str], coll: IssueCollector) -> None:
        self.base = base
        self.skip = skip  # columns of the wrong type, reported once for the whole file
        self.n = rb.num_rows
        self.cols: dict[str, pa.Array] = {}
        for name in rb.schema.names:
            if name in KNOWN_COLUMNS and name not in skip:
                self.cols[name] = plain_array(rb.column(name))
        self.coll = coll
        self.id_unknown = "id" in skip  # an id column of the wrong type: don't show a made-up id
        self.bad = np.zeros(self.n, dtype=bool)
        self._ids: pa.Array | None = None

    def ids(self) -> pa.Array | None:
        if self._ids is None and "id" in self.cols:
            a = self.cols["id"]
            self._ids = a if arrow_kind(a.type) == "string" else a.cast(pa.string())
        return self._ids

    def id_at(self, i: int) -> str | None:
        ids = self.ids()
        if ids is None:
            return None if self.id_unknown else default_row_id(self.base + i)
        try:
            v = ids[i].as_py()
        except UnicodeDecodeError:
            return None
        return v

    def flag(self, column: str, mask: Any, rule: str, fix: str | Callable[[Any], str], values: pa.Array | None = None) -> None:
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.fill_null(False).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        self.bad[idx] = True
        coll = self.coll
        coll.count += len(idx)
        values = values if values is not None else self.cols.get(column)
        for i in idx[: coll.limit].tolist():
            if coll.full_before(self.base + i):
                break
            value = value_at(values, i) if values is not None else "None"
            coll.kept.append(
                RowIssue(
                    row=self.base + i,
                    id=self.id_at(i),
                    column=column,
                    value=value,
                    rule=rule,
                    fix=fix(values[i].as_py() if values is not None else None) if callable(fix) else fix,
                )
            )
        coll._sort()


class PromptSyntax:
    """AUTOMATIC1111 prompt syntax in the prompts (``data.prompt_syntax``): the forms sdbatch
    refuses are row errors, the others counted for one warning each — emphasis and BREAK only
    where the model's family does not weight prompts (``FamilyAdapter.weighted_prompts``) or is
    not known; nothing with ``literal`` (``--literal-prompts``)."""

    def __init__(self, literal: bool, family: FamilyAdapter | None = None) -> None:
        self.literal = literal
        self.weighted = family is not None and family.weighted_prompts is not None
        self.reader = LITERAL_READER.format(family=family.name) if family is not None else UNKNOWN_READER
        self.seen: dict[str, tuple[int, int]] = {}  # form → rows, first row

    def check(self, b: BatchUnderCheck, column: str, texts: pa.Array | None) -> None:
        if self.literal or texts is None or not pc.any(pc.match_substring_regex(texts, ANY_FORM)).as_py():
            return
        for form in PROMPT_SYNTAX:
            if form.weighting and self.weighted:
                continue
            hits = pc.match_substring_regex(texts, form.pattern)
            if form.refused:
                b.flag(column, hits, REFUSED_RULE.format(form=form.name), REFUSED_FIX, texts)
                continue
            rows = np.flatnonzero(hits.fill_null(False).to_numpy(zero_copy_only=False))
            if len(rows):
                count, first = self.seen.get(form.name, (0, b.base + int(rows[0])))
                self.seen[form.name] = (count + len(rows), first)

    def warnings(self) -> list[str]:
        return [WARNING.format(count=count, form=form, row=first, reader=self.reader)
                for form, (count, first) in self.seen.items()]


def filled_numpy(arr: pa.Array, fill: Any, dtype: Any) -> np.ndarray:
    if arr.null_count:
        arr = arr.fill_null(pa.scalar(fill, arr.type) if not pa.types.is_null(arr.type) else fill)
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def check_text(b: BatchUnderCheck, column: str, limits: Any, required: bool) -> pa.Array | None:
    """Checks shared by prompt and negative_prompt; returns the array with invalid-UTF-8
    rows nulled (safe for further string kernels), or None when the column is absent."""
    arr = b.cols.get(column)
    if arr is None:
        return None
    if pa.types.is_null(arr.type):
        if required:
            b.flag(column, np.ones(b.n, bool), f"{column} is required: every row needs a non-null text",
                   "give every row a prompt (or drop rows without one)", arr)
        return None
    nulls = arr.is_null()
    arr = check_utf8(b, column, arr)  # rows with invalid UTF-8 become null from here on
    if required:
        b.flag(column, nulls, f"{column} is required: every row needs a non-null text",
               "give every row a prompt (or drop rows without one)", arr)
        lengths = pc.utf8_length(arr)
        empty = pc.or_(pc.equal(lengths, 0), pc.utf8_is_space(arr))
        b.flag(column, empty, f"{column} must not be empty or only whitespace", "write a prompt, or drop the row", arr)
    else:
        lengths = pc.utf8_length(arr)
    limit = limits.max_prompt_chars
    b.flag(
        column,
        pc.greater(lengths, limit),
        f"at most {limit:,} characters (limits.max_prompt_chars)",
        "shorten the text (the text encoder reads only its first 77 tokens) or raise the limit: --set limits.max_prompt_chars=N",
        arr,
    )
    b.flag(column, pc.match_substring(arr, "\x00"), "no NUL characters (\\x00) in text",
           "remove the NUL characters (often a sign of binary data or a broken export)", arr)
    return arr


def check_utf8(b: BatchUnderCheck, column: str, arr: pa.Array) -> pa.Array:
    try:
        arr.validate(full=True)
        return arr
    except pa.ArrowInvalid:
        pass
    binary = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    bad = np.zeros(len(arr), dtype=bool)
    for i, v in enumerate(binary.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    b.flag(
        column,
        bad,
        "text must be valid UTF-8 (no lone surrogates U+D800–U+DFFF, no broken byte sequences)",
        "re-encode the text as UTF-8 and remove lone surrogate characters",
        arr,
    )
    cleaned = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    b.cols[column] = cleaned
    return cleaned


def check_range(b: BatchUnderCheck, column: Column, limits: Any) -> None:
    """A column's ``Range`` rule (column table) on every non-null value of the batch."""
    rule, arr, name = column.range, b.cols.get(column.name), column.name
    if rule is None or arr is None or pa.types.is_null(arr.type):
        return
    if rule.multiple_of:
        low_bits = pa.scalar(rule.multiple_of - 1, arr.type)  # multiple_of is a power of two
        b.flag(name, pc.not_equal(pc.bit_wise_and(arr, low_bits), pa.scalar(0, arr.type)),
               f"{name} must be a multiple of {rule.multiple_of}", f"round {name} to a multiple of {rule.multiple_of} (e.g. 512)")
    values, nonfinite = arr, None
    if rule.finite is not None:
        values = arr.cast(pa.float64())
        nonfinite = pc.or_(pc.is_nan(values), pc.is_inf(values))
        b.flag(name, nonfinite, f"{name} must be finite (no NaN or infinity)", rule.finite)
    hi = rule.upper(limits)
    hi = pa.scalar(hi, pa.uint64()) if pa.types.is_unsigned_integer(arr.type) else hi
    low_ok = pc.greater(values, rule.lo) if rule.lo_open else pc.greater_equal(values, rule.lo)
    high_ok = pc.less(values, hi) if rule.hi_open else pc.less_equal(values, hi)
    bad = pc.invert(pc.and_(low_ok, high_ok))  # NaN compares false: out of range
    if nonfinite is not None:
        bad = pc.and_(bad, pc.invert(nonfinite))  # already reported as not finite
    b.flag(name, bad, rule.text(name, limits), rule.fix_for)


def check_loras(b: BatchUnderCheck, prompts: pa.Array | None, declared: dict[str, str]) -> None:
    """The rows' adapter references (``loras`` column and ``<lora:…>`` prompt tags): well formed,
    declared by the job, one scale per adapter. Only rows that have any are looked at."""
    column = b.cols.get("loras")
    if column is not None and not pa.types.is_null(column.type):
        column = check_utf8(b, "loras", column)
        given = pc.is_valid(column).to_numpy(zero_copy_only=False)
    else:
        column, given = None, np.zeros(b.n, dtype=bool)
    tagged = (pc.match_substring(prompts, "<lora:").fill_null(False).to_numpy(zero_copy_only=False)
              if prompts is not None else np.zeros(b.n, dtype=bool))
    for i in np.flatnonzero(given | tagged).tolist():
        value = column[i].as_py() if column is not None and given[i] else None
        try:
            row_loras(prompts[i].as_py() if prompts is not None and tagged[i] else "", value, declared)
        except LoraError as exc:
            name = "loras" if given[i] else "prompt"
            one = np.zeros(b.n, dtype=bool)
            one[i] = True
            b.flag(name, one, str(exc), "write NAME:SCALE entries (or <lora:NAME:SCALE> tags) naming declared adapters",
                   column if given[i] else prompts)


def check_controlnets(b: BatchUnderCheck, declared: dict[str, str]) -> None:
    """The rows' ControlNets (``controlnet`` column) and control images: well formed, declared by
    the job, an image for each, and on a text-to-image row. Only rows that set either are looked at."""
    columns = {name: check_utf8(b, name, arr) for name in ("controlnet", "control_image")
               if (arr := b.cols.get(name)) is not None and not pa.types.is_null(arr.type)}
    if not columns:
        return
    given = set_in_row(b, "controlnet") | set_in_row(b, "control_image")
    with_init = set_in_row(b, "init_image")
    for i in np.flatnonzero(given).tolist():
        values = {name: arr[i].as_py() for name, arr in columns.items()}
        one = np.zeros(b.n, dtype=bool)
        one[i] = True
        if values.get("controlnet") is not None and with_init[i]:
            b.flag("controlnet", one, "ControlNets run on text-to-image rows only, and this row sets init_image",
                   "leave init_image or controlnet null for this row", columns["controlnet"])
            continue
        try:
            row_controlnets(values.get("controlnet"), values.get("control_image"), declared)
        except ControlNetError as exc:
            name = "controlnet" if values.get("controlnet") is not None else "control_image"
            b.flag(name, one, str(exc), "write NAME:SCALE entries naming declared ControlNets, with one control image "
                   f"or one per ControlNet separated by '{IMAGE_SEPARATOR}'", columns[name])


def set_in_row(b: BatchUnderCheck, name: str) -> np.ndarray:
    """Per row of the batch: is column ``name`` set (a column of the wrong type counts as set,
    so its type error is not buried under errors of the columns that depend on it)."""
    if name in b.skip:
        return np.ones(b.n, dtype=bool)
    arr = b.cols.get(name)
    if arr is None or pa.types.is_null(arr.type):
        return np.zeros(b.n, dtype=bool)
    return pc.is_valid(arr).to_numpy(zero_copy_only=False)


def check_applies(b: BatchUnderCheck, column: Column, spec: JobSpec) -> None:
    """A conditional column (``Column.applies_when``) set in a row where it does not apply."""
    when = column.applies_when
    arr = b.cols.get(column.name)
    if when is None or arr is None or pa.types.is_null(arr.type):
        return
    if when.row_column is not None:  # set in the row, or for every row by its spec default (hires_scale)
        applies = set_in_row(b, when.row_column) | (getattr(spec.defaults, when.row_column, None) is not None)
    else:
        value: Any = spec
        for key in str(when.spec_key).split("."):  # model.refiner; ip_adapter, a top-level key
            value = getattr(value, key)
        applies = np.full(b.n, value is not None)
    b.flag(column.name, pc.is_valid(arr).to_numpy(zero_copy_only=False) & ~applies, when.rule, when.fix, arr)


def check_hires_size(b: BatchUnderCheck, width: np.ndarray, height: np.ndarray, spec: JobSpec) -> None:
    """A hires-fix row's upscaled size (``data.hires.hires_size``): on the ``HIRES_MULTIPLE``
    grid, within ``limits.max_width`` / ``max_height`` / ``max_pixels``. ``width`` and ``height``
    are the rows' first-pass sizes (defaults filled in)."""
    default = spec.defaults.hires_scale
    arr = b.cols.get("hires_scale")
    fill = np.nan if default is None else float(default)
    scale = (filled_numpy(arr.cast(pa.float64()), fill, np.float64) if arr is not None and not pa.types.is_null(arr.type)
             else np.full(b.n, fill))
    valid = np.nan_to_num(scale) > 1  # out of its range: the range rule says so
    wide, high = np.round(width * np.nan_to_num(scale)), np.round(height * np.nan_to_num(scale))
    off = valid & ((wide % HIRES_MULTIPLE != 0) | (high % HIRES_MULTIPLE != 0))
    lim = spec.limits
    over = valid & ~off & ((wide > lim.max_width) | (high > lim.max_height) | (wide * high > lim.max_pixels))
    if not (off | over).any():
        return
    values = pa.array([f"{int(width[i])}x{int(height[i])} × {scale[i]:g} = {int(wide[i])}x{int(high[i])}"
                       if off[i] or over[i] else None for i in range(b.n)], pa.string())
    b.flag("hires_scale", off, f"the hires-fix size (width and height × hires_scale) must be a multiple of {HIRES_MULTIPLE}",
           "pick a hires_scale that gives whole multiples of 8 (2 always does), or change width/height", values)
    b.flag("hires_scale", over, f"the hires-fix size must be at most {lim.max_width}x{lim.max_height} "
           f"(limits.max_width, max_height) and {lim.max_pixels:,} pixels (limits.max_pixels)",
           "use a smaller hires_scale or size, or raise the limits (--set limits.max_pixels=N)", values)


def check_model_rules(b: BatchUnderCheck, family: FamilyAdapter, rules: tuple[RowRule, ...], spec: JobSpec) -> None:
    """What the model cannot run: a column its family does not honour set in a row, and the
    model's row rules on a column it honours (``ModelTraits.rules_for_rows``) on every value a
    row sets (the job default is checked once, by ``check_spec_defaults``). A rule on two columns (``RowRule.paired``)
    reads each as the row will run it (a null: the job default) wherever the row sets either,
    and shows both values."""
    for name, arr in b.cols.items():
        if name not in family.honours and not pa.types.is_null(arr.type):
            b.flag(name, pc.is_valid(arr), f"{name} is not used by {family.name} models ({family.class_name})",
                   f"leave {name} null for this model, or use a model that takes it", arr)
    if family.edits:  # an instruction-edit model edits each row's source image
        b.flag("init_image", ~set_in_row(b, "init_image"), f"{family.name} models ({family.class_name}) edit a "
               "source image: every row needs an init_image", "set init_image to the image this row's prompt edits")
    for rule in rules:
        if rule.paired is None:
            arr = b.cols.get(rule.column)
            if arr is None or pa.types.is_null(arr.type):
                continue
            given = pc.is_valid(arr).to_numpy(zero_copy_only=False)
            values = arr.fill_null(rule.null_as).to_numpy(zero_copy_only=False)
            b.flag(rule.column, given & rule.refuses(values), rule.rule, rule.fix, arr)
            continue
        names = (rule.paired, rule.column)  # the paired (short) value first: a long text is cut when shown
        given = set_in_row(b, names[0]) | set_in_row(b, names[1])
        if not given.any() or names[0] in b.skip or names[1] in b.skip:
            continue
        run = [row_values(b, name, getattr(spec.defaults, name)) for name in names]
        refused = given & rule.refuses(run[1].to_numpy(zero_copy_only=False), run[0].to_numpy(zero_copy_only=False))
        b.flag(rule.column, refused, rule.rule, rule.fix, pa.StructArray.from_arrays(run, names=list(names)))


def row_values(b: BatchUnderCheck, name: str, default: Any) -> pa.Array:
    """Column ``name`` of the batch as the rows will run it: a null (or an absent column) is the job default."""
    arr = b.cols.get(name)
    if arr is None or pa.types.is_null(arr.type):
        return pa.array([default] * b.n)
    if pa.types.is_integer(arr.type) and isinstance(default, float):
        arr = arr.cast(pa.float64())  # a column of whole guidance scales, a default of 7.5
    return arr.fill_null(pa.scalar(default, arr.type))


def check_spec_defaults(spec: JobSpec, coll: IssueCollector, samplers: tuple[str, ...],
                        model_rules: tuple[RowRule, ...] = ()) -> None:
    d, lim = spec.defaults, spec.limits

    def bad(key: str, value: Any, rule: str, fix: str) -> None:
        coll.add(RowIssue(-1, None, f"defaults.{key}", repr_value(value), rule, fix))

    for column in DEFAULTED:
        rule, value = column.range, getattr(d, column.name)
        if rule is not None and value is not None and not rule.accepts(value, lim):  # None: off (hires_scale)
            grid = f"a multiple of {rule.multiple_of} with " if rule.multiple_of else ""
            finite = "finite and " if rule.finite else ""
            raise_limit = f", or raise limits.{rule.hi}" if isinstance(rule.hi, str) else ""
            default = "null" if column.default is None else column.default  # null: the model's own
            fix = rule.fix_for(value) if rule.low_fix else f"--set defaults.{column.name}={default}{raise_limit}"
            bad(column.name, value, f"{finite}{grid}{rule.text(column.name, lim)}", fix)
    if d.width * d.height > lim.max_pixels:
        bad("width", f"{d.width}x{d.height}", f"width*height <= {lim.max_pixels:,} (limits.max_pixels)",
            "choose a smaller default size or raise limits.max_pixels")
    if len(d.negative_prompt) > lim.max_prompt_chars or "\x00" in d.negative_prompt:
        bad("negative_prompt", d.negative_prompt, f"at most {lim.max_prompt_chars:,} characters, no NUL", "shorten it")
    if d.scheduler not in samplers:
        bad("scheduler", d.scheduler, f"one of {', '.join(samplers)} (the model's samplers)", "--set defaults.scheduler=default")
    for model_rule in model_rules:
        value = getattr(d, model_rule.column)
        if model_rule.paired is not None:
            paired = getattr(d, model_rule.paired)
            if model_rule.refuses_value(value, paired):
                bad(model_rule.column, {model_rule.paired: paired, model_rule.column: value}, model_rule.rule,
                    f"{model_rule.fix} (--set defaults.{model_rule.paired}=N, or --set defaults.{model_rule.column}=)")
        elif model_rule.refuses_value(value):
            bad(model_rule.column, value, model_rule.rule,
                model_rule.default_fix or f"{model_rule.fix} (--set defaults.{model_rule.column}=N)")


def scheduler_fix(value: Any, samplers: tuple[str, ...]) -> str:
    names = ", ".join(samplers)
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower().replace("-", "_").replace(" ", "_"), samplers, n=1, cutoff=0.5)
        if close:
            return f"did you mean {close[0]!r}? supported: {names}"
    return f"use one of: {names} (or leave it null for the job default)"


def _unrecordable(t: pa.DataType) -> pa.DataType | None:
    """The part of a passthrough column's type that JSON (the image record) cannot hold faithfully."""
    if pa.types.is_dictionary(t):
        return _unrecordable(t.value_type)
    if any(test(t) for test in _UNRECORDABLE_TYPES):
        return t
    nested = (t.field(i).type for i in range(t.num_fields)) if pa.types.is_nested(t) else ()
    return next((u for u in map(_unrecordable, nested) if u is not None), None)


_UNRECORDABLE_TYPES = (pa.types.is_timestamp, pa.types.is_date, pa.types.is_time, pa.types.is_decimal,
                       pa.types.is_duration, pa.types.is_binary, pa.types.is_large_binary,
                       pa.types.is_fixed_size_binary, getattr(pa.types, "is_binary_view", lambda _: False))


def check_passthrough_columns(manifest: Manifest, coll: IssueCollector, strict: bool) -> list[str]:
    """Passthrough columns that would break the index or the record are refused, and so are other
    tools' names for a per-row column or setting (``cfg_scale``, ``enable_hr``: ``data.aliases``);
    names that look like a misspelled per-row column (``widht``) are warned about — refused with
    ``strict``."""
    warnings = []
    for name in manifest.passthrough_columns:
        t = manifest.schema.field(name).type
        if name in RESERVED_COLUMNS:
            coll.add(RowIssue(0, None, name, "a passthrough column",
                              f"passthrough column names must differ from the index's own columns ({', '.join(RESERVED_COLUMNS)})",
                              f"rename the column, e.g. to 'label_{name}'"))
        bad_type = _unrecordable(t)
        if bad_type is not None:
            coll.add(RowIssue(0, None, name, f"a passthrough column of type {t}",
                              f"passthrough values go into each image's JSON record, which has no faithful form for {bad_type}",
                              "cast the column to string before writing the manifest (ISO 8601 for dates and times; "
                              "pandas: df[col] = df[col].astype(str); pyarrow: pc.cast(col, pa.string())), or drop it"))
        alias = foreign(name)
        if alias is not None:  # refused even without --strict: the row would silently render with the default
            what = (f"another tool's name (AUTOMATIC1111, ComfyUI or diffusers) for sdbatch's column {alias.column!r}"
                    if alias.column else "another tool's setting (AUTOMATIC1111, ComfyUI or diffusers) that sdbatch has "
                    "no per-row column for")
            coll.add(RowIssue(0, None, name, "a passthrough column",
                              f"column {name!r} is {what}; it would be passed through as a label and every row "
                              "rendered with the job's default", alias.fix(name)))
            continue
        close = suggest(name, KNOWN_COLUMNS)
        if close and close not in manifest.columns:
            text = f"column {name!r} is not a per-row column, so it is passed through as a label: did you mean {close!r}?"
            if strict:
                coll.add(RowIssue(0, None, name, "a passthrough column", f"{text} (--strict refuses it)",
                                  f"rename it to {close!r}, or to a label name not so close to a per-row column"))
            else:
                warnings.append(f"{text} Rename it, or pass --strict to refuse such columns.")
    return warnings


def check_same_passthrough_types(manifest: Manifest, path: str, schema: pa.Schema, base: int, coll: IssueCollector) -> None:
    """Every file of a manifest gives each passthrough column the first file's type (a file where
    it is all-null is fine): the index is one table, typed by the first file."""
    for name in manifest.passthrough_columns:
        want, got = manifest.schema.field(name).type, schema.field(name).type
        if got != want and not pa.types.is_null(got):
            first, this = os.path.basename(manifest.files[0]), os.path.basename(path)
            coll.add(RowIssue(base, None, name, f"type {got} in {this}",
                              f"every file of a manifest must give passthrough column {name!r} one type "
                              f"({manifest.files[0]}: {want}; {path}: {got})",
                              f"write {name!r} with one type in every file ({first} has {want}, {this} has {got})"))
