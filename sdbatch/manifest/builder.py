"""``sdbatch manifest``: build a Parquet manifest for dataset synthesis.

Prompts come from one source — a text file (one prompt per line), a CSV/JSONL table (its
columns kept, renamed with ``--map TARGET=SOURCE``), or templates in dynamicprompts syntax
(``"a photo of a {red|green|blue} {cat|dog}"``, ``{2$$a|b|c}``, ``__colour__`` wildcards),
expanded as a product in reading order or sampled at random with a seed;
``{color=red|green}`` also records the choice in a ``color`` column. ``--grid`` axes repeat
each prompt per X/Y cell (``sdbatch.grid``). Each prompt row is repeated for every seed of
``--seeds`` (``0-99``, ``1,5,9``, ``0-9,100``), and constant columns (``--column steps=30``)
are added.

Ids are deterministic: the source's ``id`` column if it has one, else the 0-based prompt
row number zero-padded to 8 digits (as ``default_row_id``); with seeds, ``<base>-s<seed>``.
Output rows are ordered prompt-major, seeds inner. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.row import default_row_id
from sdbatch.manifest.templates import expand_template
from sdbatch.manifest.values import COLUMN_TYPES, ManifestBuildError, parse_constant, parse_seeds, seed_count, seeds_at

MAX_ROWS = 100_000_000  # a guard against typos such as --seeds 0-9999999999

def _read_prompts_file(path: Path) -> pa.Table:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestBuildError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestBuildError(f"{path}, line {line}: not valid UTF-8; re-save the file as UTF-8") from None
    prompts = [ln.rstrip("\r") for ln in text.split("\n")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ManifestBuildError(f"{path} holds no prompts (one prompt per line; blank lines are skipped)")
    return pa.table({"prompt": pa.array(prompts, pa.string())})


def _read_table_file(path: Path, mapping: Iterable[str]) -> pa.Table:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ManifestBuildError(f"{path}: no such file")
    sources = {}
    for item in mapping:
        target, _, source = item.partition("=")
        sources[target.strip()] = source.strip()
    try:
        if suffix == ".csv" or suffix == ".tsv":
            import pyarrow.csv as pacsv

            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
            # text columns stay text even when they look like numbers ("007", a prompt "1984")
            text_cols = {sources.get(c, c): pa.string() for c, t in COLUMN_TYPES.items() if t == pa.string()}
            convert = pacsv.ConvertOptions(column_types=text_cols, strings_can_be_null=True)  # empty cell = null = job default
            table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            import pyarrow.json as pajson

            table = pajson.read_json(path)
        elif suffix == ".parquet":
            table = pq.read_table(path)
        else:
            raise ManifestBuildError(f"{path}: unknown table format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ManifestBuildError(f"{path}: cannot parse as {suffix.lstrip('.')}: {exc}") from None
    renames: dict[str, str] = {}
    for item in mapping:
        target, sep, source = item.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not target or not source:
            raise ManifestBuildError(f"--map {item!r}: expected TARGET=SOURCE, e.g. --map prompt=text")
        if source not in table.column_names:
            raise ManifestBuildError(f"--map {item!r}: {path} has no column {source!r} (columns: {', '.join(table.column_names)})")
        renames[source] = target
    names = [renames.get(n, n) for n in table.column_names]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ManifestBuildError(f"{path}: after --map, column name(s) {sorted(dup)} appear twice; map or drop one")
    table = table.rename_columns(names)
    if "prompt" not in table.column_names:
        raise ManifestBuildError(
            f"{path} has no 'prompt' column (columns: {', '.join(table.column_names)}); name it with --map prompt=COLUMN"
        )
    if table.num_rows == 0:
        raise ManifestBuildError(f"{path} has no rows")
    if "id" in table.column_names:
        table = table.set_column(table.column_names.index("id"), "id", table.column("id").cast(pa.string()))
    return table


def _templates_table(templates: Sequence[str], warn: Callable[[str], None], **expand: Any) -> pa.Table:
    prompts: list[str] = []
    label_names: list[str] = []
    per_template: list[tuple[int, dict[str, list[str | None]]]] = []
    for t in templates:
        p, labels = expand_template(t, **expand)
        if expand["sample"] and len(p) < expand["sample"]:
            warn(f"--sample {expand['sample']}: template {t!r} has only {len(p)} distinct prompts; wrote all {len(p)}, each once")
        per_template.append((len(p), labels))
        prompts.extend(p)
        label_names.extend(n for n in labels if n not in label_names)
    cols: dict[str, pa.Array] = {"prompt": pa.array(prompts, pa.string())}
    for name in label_names:
        values: list[str | None] = []
        for n, labels in per_template:
            values.extend(labels.get(name, [None] * n))
        cols[name] = pa.array(values, pa.string())
    return pa.table(cols)


def _chunks(base: pa.Table, seed_ranges: list[tuple[int, int]] | None, chunk_rows: int) -> Iterator[pa.Table]:
    n = base.num_rows
    k = seed_count(seed_ranges) if seed_ranges else 1
    total = n * k
    has_id = "id" in base.column_names
    width = max(8, len(str(n - 1)))
    for lo in range(0, total, chunk_rows):
        pos = np.arange(lo, min(lo + chunk_rows, total), dtype=np.int64)
        base_idx = pos // k
        chunk = base.take(pa.array(base_idx))
        if has_id:
            base_ids = chunk.column("id").to_pylist()
            if any(v is None for v in base_ids):
                raise ManifestBuildError("the source's id column has empty values; fill them or drop the column")
        else:
            base_ids = [f"{i:0{width}d}" if width > 8 else default_row_id(i) for i in base_idx.tolist()]
        cols: dict[str, pa.Array] = {}
        if seed_ranges:
            seeds = seeds_at(seed_ranges, pos % k)
            ids = [f"{b}-s{s}" for b, s in zip(base_ids, seeds.tolist())]
            cols["id"] = pa.array(ids, pa.string())
            cols["prompt"] = chunk.column("prompt")
            cols["seed"] = pa.array(seeds, pa.int64())
        else:
            cols["id"] = pa.array(base_ids, pa.string())
            cols["prompt"] = chunk.column("prompt")
        for name in chunk.column_names:
            if name not in cols:
                cols[name] = chunk.column(name)
        yield pa.table(cols)


def build_manifest(
    out: str | os.PathLike[str],
    *,
    prompts_file: str | os.PathLike[str] | None = None,
    table_file: str | os.PathLike[str] | None = None,
    mapping: Iterable[str] = (),
    templates: Sequence[str] = (),
    seeds: str | None = None,
    columns: Iterable[str] = (),
    row_group_size: int = 65_536,
    overwrite: bool = False,
    wildcards: str | os.PathLike[str] | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
    grid: Sequence[str] = (),
    warn: Callable[[str], None] = logging.getLogger(__name__).warning,
) -> int:
    """Write the manifest to ``out`` (atomically: a temporary file renamed into place) and
    return its number of rows. Templates expand with ``wildcards`` files, every prompt or
    ``sample`` distinct random ones (``sample_seed``; ``warn`` says when there are fewer); ``grid`` axes repeat each prompt per cell."""
    sources = [s for s in (prompts_file, table_file, templates or None) if s]
    if len(sources) != 1:
        raise ManifestBuildError("give exactly one prompt source: --prompts FILE, --from FILE, or --template (repeatable)")
    if row_group_size < 1:
        raise ManifestBuildError("--row-group-size must be at least 1")
    out = Path(out)
    if prompts_file:
        base = _read_prompts_file(Path(prompts_file))
    elif table_file:
        base = _read_table_file(Path(table_file), mapping)
    else:
        base = _templates_table(templates, warn, wildcards=Path(wildcards) if wildcards else None, sample=sample,
                                sample_seed=sample_seed)
    if (wildcards or sample) and not templates:
        raise ManifestBuildError("--wildcards and --sample only apply to --template")
    if sample is not None and sample < 1:
        raise ManifestBuildError("--sample must be at least 1")
    if grid:
        from sdbatch.manifest.axes import GridError, expand_grid, parse_axes

        try:
            base = expand_grid(base, parse_axes(list(grid)), COLUMN_TYPES)
        except GridError as exc:
            raise ManifestBuildError(str(exc)) from None
    if mapping and not table_file:
        raise ManifestBuildError("--map only applies to --from FILE")
    seed_ranges = parse_seeds(seeds) if seeds else None
    if seed_ranges and "seed" in base.column_names:
        raise ManifestBuildError("the source already has a 'seed' column; drop it or leave out --seeds")
    constants = dict(parse_constant(c) for c in columns)
    clash = sorted(set(constants) & (set(base.column_names) | {"seed" if seed_ranges else ""}))
    if clash:
        raise ManifestBuildError(f"--column {clash[0]}: the manifest already has a {clash[0]!r} column")
    total = base.num_rows * (seed_count(seed_ranges) if seed_ranges else 1)
    if total > MAX_ROWS:
        raise ManifestBuildError(f"that makes {total:,} rows (limit {MAX_ROWS:,}); use fewer prompts or seeds, or split the job")
    if out.exists() and not overwrite:
        raise ManifestBuildError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = None
    written = 0
    try:
        for chunk in _chunks(base, seed_ranges, chunk_rows=row_group_size * max(1, 262_144 // row_group_size)):
            for name, value in constants.items():
                typ = COLUMN_TYPES.get(name)
                chunk = chunk.append_column(name, pa.array([value] * chunk.num_rows, typ))
            if writer is None:
                writer = pq.ParquetWriter(tmp, chunk.schema)
            writer.write_table(chunk, row_group_size=row_group_size)
            written += chunk.num_rows
        if writer is not None:
            writer.close()
            writer = None
        os.replace(tmp, out)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestBuildError(f"cannot write {out}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return written
