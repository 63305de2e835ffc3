"""``sdbatch stats``: what a job's index holds — rows ok and failed, blank images, duplicates,
counts per label (passthrough) column and the distributions of the score columns.
A list, struct or map label is counted by its JSON text (pyarrow's ``value_counts`` takes
only flat types).

Computed from the index alone with pyarrow compute; no image is read and no torch imported.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_FAILED, STATUS_OK

#: Numeric index columns whose distributions are reported.
SCORE_COLUMNS = ("luma_mean", "luma_std", "clip_score", "generate_seconds")
QUANTILES = (0.05, 0.5, 0.95)
MAX_LABEL_VALUES = 20  # per label column; the rest are summed as "(other)"
JSON_SLICE_ROWS = 65_536  # a nested label is turned into Python values this many rows at a time


def _count(mask: pa.ChunkedArray) -> int:
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def _distribution(values: pa.ChunkedArray) -> dict[str, Any] | None:
    values = values.drop_null()
    if len(values) == 0:
        return None
    quantiles = pc.quantile(values, q=list(QUANTILES)).to_pylist()
    return {
        "count": len(values),
        "mean": round(pc.mean(values).as_py(), 4),
        "min": round(pc.min(values).as_py(), 4),
        **{f"p{round(q * 100)}": round(v, 4) for q, v in zip(QUANTILES, quantiles)},
        "max": round(pc.max(values).as_py(), 4),
    }


def _label_counts(values: pa.ChunkedArray) -> dict[str, int]:
    if pa.types.is_nested(values.type):  # list, struct, map: value_counts has no kernel for them
        tally = Counter("None" if v is None else json.dumps(v, sort_keys=True, default=str)
                        for chunk in values.chunks for start in range(0, len(chunk), JSON_SLICE_ROWS)
                        for v in chunk.slice(start, JSON_SLICE_ROWS).to_pylist())
    else:
        tally = Counter({str(v["values"]): int(v["counts"]) for v in pc.value_counts(values).to_pylist()})
    counts = sorted(tally.items(), key=lambda item: (-item[1], item[0]))
    top = dict(counts[:MAX_LABEL_VALUES])
    rest = sum(n for _, n in counts[MAX_LABEL_VALUES:])
    return {**top, "(other)": rest} if rest else top


def job_stats(index: pa.Table, final: bool = True) -> dict[str, Any]:
    """The statistics of one job's index, as JSON-serialisable data; duplicates are known only
    in the ``final`` (merged) index."""
    def has(column: str) -> bool:
        return column in index.column_names

    status = index.column("status") if has("status") else pa.chunked_array([], pa.string())
    labels = [c for c in index.column_names if c not in INDEX_COLUMN_TYPES]
    return {
        "rows": index.num_rows,
        "ok": _count(pc.equal(status, STATUS_OK)),
        "failed": _count(pc.equal(status, STATUS_FAILED)),
        "blank": _count(pc.fill_null(index.column("blank"), False)) if has("blank") else None,
        "duplicates": _count(pc.is_valid(index.column("duplicate_of"))) if final and has("duplicate_of") else None,
        "labels": {c: _label_counts(index.column(c)) for c in labels},
        "scores": {c: _distribution(index.column(c)) for c in SCORE_COLUMNS if has(c) and index.column(c).null_count < index.num_rows},
    }


def render(stats: dict[str, Any]) -> str:
    lines = [
        f"rows        {stats['rows']}",
        f"ok          {stats['ok']}",
        f"failed      {stats['failed']}",
        f"blank       {stats['blank'] if stats['blank'] is not None else 'n/a'}",
        f"duplicates  {stats['duplicates'] if stats['duplicates'] is not None else 'n/a (index not merged yet)'}",
    ]
    lines += _section("labels", stats["labels"]) + _section("scores", stats["scores"])
    return "\n".join(lines)


def _section(title: str, columns: dict[str, dict[str, Any]]) -> list[str]:
    """One line per column under a title, named by the column alone (a column called ``label``
    reads ``labels      label: a=1``, not ``label label:``)."""
    return [f"{title if i == 0 else '':<12}{column}: " + ", ".join(f"{key}={value}" for key, value in values.items())
            for i, (column, values) in enumerate(columns.items())]
