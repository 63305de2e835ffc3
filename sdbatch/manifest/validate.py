"""Validating a manifest against the column table and the job spec (design.md §3): every row is
read once, in record batches, and each broken rule is reported with its row, column, value and
fix (``report``); the rules themselves are ``rules``', duplicate ids and distinct prompts are
counted by ``hashing``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.data.columns import COLUMN, COLUMNS, CONDITIONAL, IMAGE_COLUMNS, KNOWN_COLUMNS
from sdbatch.data.row import ID_PATTERN, MAX_SEED
from sdbatch.data.samplers import SCHEDULERS, sampler_name
from sdbatch.manifest.hashing import DistinctCounter, find_duplicate_ids, hash_strings
from sdbatch.manifest.init_roots import unreadable_init_image
from sdbatch.manifest.reader import guarded_batches, passthrough_types, resolve_images
from sdbatch.manifest.report import RowIssue, ValidationReport, arrow_kind
from sdbatch.manifest.rules import (
    BatchUnderCheck,
    IssueCollector,
    PromptSyntax,
    ValueCounts,
    check_applies,
    check_controlnets,
    check_hires_size,
    check_loras,
    check_model_rules,
    check_passthrough_columns,
    check_range,
    check_same_passthrough_types,
    check_spec_defaults,
    check_text,
    check_utf8,
    filled_numpy,
    scheduler_fix,
    set_in_row,
)
from sdbatch.manifest.sources import Manifest, ManifestError, parquet_file
from sdbatch.models.families import ModelTraits
from sdbatch.spec import MODEL_FILLED, JobSpec
from sdbatch.storage.base import TMP_MARK


def canonical_names(schedulers: pa.Array) -> pa.Array:
    """Sampler names as rows will hold them (AUTOMATIC1111's ``DPM++ 2M Karras`` → ``dpmpp_2m_karras``),
    each distinct value converted once."""
    encoded = pc.dictionary_encode(schedulers)
    names = [sampler_name(v) if v is not None else None for v in encoded.dictionary.to_pylist()]
    return pa.array(names, pa.string()).take(encoded.indices)


class UnreadableInitImages:
    """Local init images (and every other ``columns.IMAGE_COLUMNS``: masks, each control image)
    that are missing, not regular files or not readable now: a warning listing the rows (such a
    row fails at generation), or with ``strict`` each row refused."""

    FIX = "fix the path (a relative one starts at the manifest's folder), or leave the row's {column} null"

    def __init__(self, base_dir: str, shown: int) -> None:
        self.base_dir, self.shown = base_dir, shown
        self.count, self.listed, self.columns = 0, list[str](), dict[str, None]()

    def check(self, b: BatchUnderCheck, init: pa.Array, strict: bool, column: str = "init_image") -> None:
        """``init``: the rows' ``column`` values (each image a value names: ``Column.image_locations``)."""
        found = {i: problem for i, value in enumerate(init.to_pylist())
                 for part in COLUMN[column].image_locations(value)
                 if part and "\x00" not in part and (problem := unreadable_init_image(part, self.base_dir))}
        fix = self.FIX.format(column=column)
        if strict:
            for why in sorted({why for _, why in found.values()}):
                rows = np.isin(np.arange(b.n), [i for i, (_, w) in found.items() if w == why])
                b.flag(column, rows, f"{column} must be a readable file; this one {why}",
                       lambda value: f"{fix} (--strict refuses it; it resolves to "
                                     f"{resolve_images(COLUMN[column], value, self.base_dir)})", init)
            return
        self.count += len(found)
        if found:
            self.columns[column] = None
        for i, (path, why) in found.items():
            if len(self.listed) < self.shown:
                self.listed.append(f"row {b.base + i} (id {b.id_at(i)}): {column} {path} {why}"
                                   if column != "init_image" else f"row {b.base + i} (id {b.id_at(i)}): {path} {why}")

    def warnings(self) -> list[str]:
        if not self.count:
            return []
        more = f"; … {self.count - len(self.listed):,} more" if self.count > len(self.listed) else ""
        named = " or ".join(self.columns)
        return [f"{self.count:,} row(s) whose {named} cannot be read now, so they will fail at generation "
                f"({'; '.join(self.listed)}{more}). Fix: {self.FIX.format(column=named)}; --strict refuses such rows."]


def validate_manifest(manifest: Manifest, spec: JobSpec, batch_size: int = 65_536, *, strict: bool = False,
                      model: ModelTraits | None = None, literal_prompts: bool = False) -> ValidationReport:
    """Check every row against design.md §3, streaming (one record batch in memory at a time).

    Semantics of nulls: a null in ``negative_prompt``, ``steps``, ``guidance_scale``,
    ``width``, ``height``, ``scheduler`` or ``strength`` means "the job default"; a null
    ``init_image`` makes the row text-to-image. A null ``prompt``, ``id`` or ``seed`` is an
    error — to derive seeds, leave the ``seed`` column out (a half-filled seed column is
    usually a broken join). Ranges are checked on the resolved values, and job defaults are
    checked once (reported with row -1 and the spec key).

    Duplicate ids are found with one 64-bit hash per row (8 bytes/row) sorted in numpy, then
    the first duplicates are confirmed by their actual strings in a second pass over ``id``.
    ``distinct prompts`` is exact up to 65,536 and a K-minimum-values estimate beyond.
    ``model`` (the model's traits, when known) limits the samplers rows may ask for, the columns
    they may set (the family's ``honours``), and brings the model's row rules (clip_skip within
    its text encoder's depth), so a row the model cannot run is refused before any worker starts.
    ``literal_prompts`` (or ``model.prompt_syntax: literal``): prompts mean AUTOMATIC1111's brackets
    literally (no syntax check).
    """
    lim, d = spec.limits, spec.defaults
    unknown = [name for name in MODEL_FILLED if getattr(d, name) is None]
    if unknown:
        raise ManifestError(f"the native size and defaults of model {spec.model.name!r} are not known here; "
                            f"set {' and '.join(f'defaults.{n}' for n in unknown)}")
    if len(manifest.columns) > lim.max_columns:  # before anything reads per column
        raise ManifestError(
            f"manifest {manifest.source} has {len(manifest.columns):,} columns, more than limits.max_columns "
            f"({lim.max_columns:,}): each column is a column of the index and a key of every image's record. Fix: "
            "write only the columns you need as labels, or raise the limit: --set limits.max_columns=N")
    family = model.family if model else None
    samplers = family.samplers if family else SCHEDULERS
    model_rules = model.row_rules() if model else ()
    rules_for_rows = model.rules_for_rows() if model else ()
    coll = IssueCollector(lim.max_errors_shown)
    check_spec_defaults(spec, coll, samplers, model_rules)
    present = set(manifest.columns)
    read_cols = [c for c in KNOWN_COLUMNS if c in present]
    has_ids = "id" in present
    id_hashes = np.empty(manifest.num_rows if has_ids else 0, dtype=np.uint64)
    id_valid = np.zeros(manifest.num_rows if has_ids else 0, dtype=bool)
    prompts = DistinctCounter()
    sizes, steps_c, cfg_c, sched_c = ValueCounts(), ValueCounts(), ValueCounts(), ValueCounts()
    img2img = 0
    bad_rows = 0
    base = 0
    warnings = check_passthrough_columns(manifest, coll, strict)
    unreadable = UnreadableInitImages(manifest.base_dir, lim.max_errors_shown)
    syntax = PromptSyntax(literal_prompts or spec.model.prompt_syntax == "literal", family)
    for path in manifest.files:
        pf = parquet_file(path, streaming=True)
        if pf.metadata.num_rows == 0:
            continue
        schema = pf.schema_arrow
        check_same_passthrough_types(manifest, path, schema, base, coll)
        file_start = base
        skip: set[str] = set()
        for name in read_cols:
            column = COLUMN[name]
            found = arrow_kind(schema.field(name).type)
            if found not in column.kinds and found != "null":
                skip.add(name)
                coll.add(RowIssue(base, None, name, f"a column of type {schema.field(name).type} "
                                  f"(all {pf.metadata.num_rows:,} rows of {os.path.basename(path)})",
                                  f"{name} must be {column.expected}", column.type_fix))
        cols = [c for c in read_cols if c not in skip]
        file_bad_all = bool(skip)
        for rb in guarded_batches(pf, path, batch_size, cols):
            b = BatchUnderCheck(rb, base, skip, coll)
            n = b.n
            # prompt / negative_prompt
            parr = check_text(b, "prompt", lim, required=True)
            if parr is not None:
                valid = pc.is_valid(parr).to_numpy(zero_copy_only=False)
                prompts.add(np.unique(hash_strings(parr)[valid]))
            syntax.check(b, "prompt", parr)
            syntax.check(b, "negative_prompt", check_text(b, "negative_prompt", lim, required=False))
            # id
            ids = b.ids()
            if ids is not None:
                if pa.types.is_null(ids.type):
                    ids = pa.nulls(n, pa.string())
                raw = b.cols["id"]
                id_nulls = ids.is_null()
                if arrow_kind(raw.type) == "string" and not pa.types.is_null(raw.type):
                    ids = check_utf8(b, "id", ids)
                    b._ids = ids
                b.flag("id", id_nulls, "id must be set in every row when the id column is present",
                       "fill the id, or drop the id column to use row numbers", raw)
                nonnull = pc.is_valid(ids)
                dots = pc.or_(pc.equal(ids, "."), pc.equal(ids, ".."))
                b.flag("id", dots, "id must not be '.' or '..' (ids name output files)", "rename the row's id")
                pattern = pc.and_(nonnull, pc.invert(pc.match_substring_regex(ids, f"^{ID_PATTERN}$")))
                b.flag("id", pc.and_(pattern, pc.invert(dots)), f"id must match {ID_PATTERN} (ids name output files)",
                       "use only letters, digits, '.', '_' and '-', at most 128 characters", ids)
                b.flag("id", pc.match_substring(ids, TMP_MARK),
                       f"id must not contain {TMP_MARK!r} (ids name output files; storage reserves that mark for temporary files)",
                       f"rename the row's id without {TMP_MARK!r}", ids)
                id_hashes[base : base + n] = hash_strings(ids)
                id_valid[base : base + n] = nonnull.to_numpy(zero_copy_only=False)
            # seed
            seed = b.cols.get("seed")
            if seed is not None:
                b.flag("seed", seed.is_null(), "seed must be set in every row when the seed column is present "
                       "(null is not 'derive')", "fill the seed, or drop the seed column so every row derives "
                       "its seed from the job seed and its id")
                if not pa.types.is_null(seed.type):
                    too_big = (pc.greater_equal(seed, pa.scalar(MAX_SEED, pa.uint64()))
                               if pa.types.is_unsigned_integer(seed.type) else pc.less(seed, 0))
                    b.flag("seed", too_big, "0 <= seed < 2**63", "use a seed in 0..9223372036854775807")
            # the range rules of the column table: steps, guidance_scale, width, height, strength, ...
            for column in COLUMNS:
                check_range(b, column, lim)
            if family is not None:
                check_model_rules(b, family, rules_for_rows, spec)
            w = (filled_numpy(b.cols["width"], d.width, np.float64)
                 if b.cols.get("width") is not None and not pa.types.is_null(b.cols["width"].type) else np.full(n, float(d.width)))
            h = (filled_numpy(b.cols["height"], d.height, np.float64)
                 if b.cols.get("height") is not None and not pa.types.is_null(b.cols["height"].type) else np.full(n, float(d.height)))
            in_range = (w >= 64) & (w <= lim.max_width) & (h >= 64) & (h <= lim.max_height)
            over = in_range & (w * h > lim.max_pixels)
            if over.any():
                vals = pc.binary_join_element_wise(
                    pc.cast(pa.array(w.astype(np.int64)), pa.string()),
                    pc.cast(pa.array(h.astype(np.int64)), pa.string()),
                    "x",
                )
                b.flag("width", over, f"width*height <= {lim.max_pixels:,} pixels (limits.max_pixels)",
                       "use a smaller size, or raise the limit: --set limits.max_pixels=N", vals)
            check_hires_size(b, w, h, spec)
            ok_size = in_range & (w * h <= lim.max_pixels)
            sizes.add((w[ok_size].astype(np.int64) << 20) | h[ok_size].astype(np.int64))
            # guidance_scale
            g = b.cols.get("guidance_scale")
            if g is not None and not pa.types.is_null(g.type):
                gf = g.cast(pa.float64())
                gvals = filled_numpy(gf, float(d.guidance_scale), np.float64)
                cfg_c.add(gvals[np.isfinite(gvals) & (gvals >= 0) & (gvals <= lim.max_guidance)])
            else:
                cfg_c.add(np.full(1, float(d.guidance_scale)).repeat(n))
            # steps summary
            s = b.cols.get("steps")
            if s is not None and not pa.types.is_null(s.type):
                sv = filled_numpy(s, d.steps, np.float64)
                steps_c.add(sv[(sv >= 1) & (sv <= lim.max_steps)].astype(np.int64))
            else:
                steps_c.add(np.full(n, d.steps, np.int64))
            # scheduler
            sc = b.cols.get("scheduler")
            if sc is not None and not pa.types.is_null(sc.type):
                sc = canonical_names(check_utf8(b, "scheduler", sc))
                known = pc.is_in(sc, value_set=pa.array(samplers))
                rule = f"scheduler must be one of {', '.join(samplers)}" + (f" (the {family.name} family's samplers)" if family else "")
                b.flag("scheduler", pc.and_(pc.is_valid(sc), pc.invert(known)), rule,
                       lambda value: scheduler_fix(value, samplers), sc)
                vc = pc.value_counts(sc.fill_null(d.scheduler))
                for item in vc.to_pylist():
                    if item["values"] in samplers:
                        sched_c.counts[item["values"]] = sched_c.counts.get(item["values"], 0) + item["counts"]
            else:
                sched_c.counts[d.scheduler] = sched_c.counts.get(d.scheduler, 0) + n
            # init_image, strength (and every conditional column below)
            has_init = set_in_row(b, "init_image")
            for name in IMAGE_COLUMNS:  # init_image, mask_image, control_image: paths or URIs of image files
                init = b.cols.get(name)
                if init is not None and not pa.types.is_null(init.type):
                    init = check_utf8(b, name, init)
                    b.flag(name, pc.equal(pc.utf8_length(init), 0), f"{name} must be a non-empty path or s3:// URI",
                           "give the image path (relative to the manifest folder) or null"
                           + (" for text-to-image" if name == "init_image" else ""))
                    b.flag(name, pc.match_substring(init, "\x00"), f"no NUL characters (\\x00) in {name}", "fix the path")
                    unreadable.check(b, init, strict, name)
            img2img += int(has_init.sum())
            st = b.cols.get("strength")
            # img2img runs int(steps * strength) denoising steps; zero steps would make no image (an
            # instruction-edit model's rows have no strength, its default none: they run every step)
            steps_v = np.full(n, float(d.steps)) if s is None or pa.types.is_null(s.type) else filled_numpy(s, d.steps, np.float64)
            default_strength = np.nan if d.strength is None else float(d.strength)
            strength_v = (np.full(n, default_strength) if st is None or pa.types.is_null(st.type)
                          else filled_numpy(st.cast(pa.float64()), default_strength, np.float64))
            no_steps = has_init & (not (family and family.edits)) & (strength_v > 0) & (strength_v <= 1) & (steps_v >= 1) & (np.floor(steps_v * strength_v) < 1)
            b.flag("strength", no_steps, "img2img needs steps * strength >= 1 (it runs int(steps * strength) denoising steps)",
                   "raise strength or steps for this row", pa.array(strength_v))
            for column in CONDITIONAL:
                check_applies(b, column, spec)
            check_loras(b, parr, spec.loras)
            check_controlnets(b, spec.controlnets)
            if file_bad_all:
                b.bad[:] = True
            bad_rows += int(b.bad.sum())
            base += n
        if base - file_start != pf.metadata.num_rows:
            raise ManifestError(
                f"{path}: its Parquet footer says {pf.metadata.num_rows:,} rows but its data holds {base - file_start:,}; "
                "the file is corrupt or was cut short — write it again"
            )
    # --- duplicate ids -------------------------------------------------------------------------
    dup_count = 0
    if has_ids and manifest.num_rows:
        dup_count = find_duplicate_ids(manifest, id_hashes, id_valid, coll, batch_size)
        bad_rows += dup_count
    del id_hashes, id_valid
    distinct, approx = prompts.estimate()
    summary: dict[str, Any] = {
        "source": manifest.source,
        "files": len(manifest.files),
        "fingerprint": manifest.fingerprint,
        "rows": manifest.num_rows,
        "distinct_prompts": distinct,
        "distinct_prompts_approximate": approx,
        "sizes": {f"{k >> 20}x{k & 0xFFFFF}": v for k, v in sizes.counts.items()},
        "steps": {int(k): v for k, v in steps_c.counts.items()},
        "guidance_scale": {float(k): v for k, v in cfg_c.counts.items()},
        "schedulers": dict(sched_c.counts),
        "img2img_rows": img2img,
        "seeds": "from the seed column" if "seed" in present
        else f"derived from job seed {spec.seed} and each row's id (derive_seed)",
        "ids": "from the id column" if has_ids else "row numbers (default_row_id: 00000000, 00000001, …)",
        "passthrough_columns": {c: str(manifest_type) for c, manifest_type in passthrough_types(manifest).items()},
        "bad_rows": min(bad_rows, manifest.num_rows),
    }
    return ValidationReport(num_rows=manifest.num_rows, issues=list(coll.kept), issue_count=coll.count, summary=summary,
                            warnings=warnings + syntax.warnings() + unreadable.warnings())
