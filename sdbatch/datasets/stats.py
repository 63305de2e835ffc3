"""``sdbatch stats``: what a job's index holds — rows ok and failed, blank images, duplicates,
counts per label (passthrough) column and the distributions of the score columns.
A list, struct or map label is counted by its JSON text (pyarrow's ``value_counts`` takes
only flat types).

Computed from the index alone, a record batch at a time (``output.index.JobIndex``), with
pyarrow compute and numpy; no image is read and no torch imported.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_FAILED, STATUS_OK
from sdbatch.output.index import JobIndex

#: Numeric index columns whose distributions are reported.
SCORE_COLUMNS = ("luma_mean", "luma_std", "clip_score", "generate_seconds")
QUANTILES = (0.05, 0.5, 0.95)
MAX_LABEL_VALUES = 20  # per label column; the rest are summed as "(other)"
JSON_SLICE_ROWS = 65_536  # a nested label is turned into Python values this many rows at a time
QUANTILE_SAMPLE = 65_536  # values per score column the quantiles are computed from (exact up to it)


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


class _Distribution:
    """One score column's count, mean, min, max and quantiles, fed a batch at a time: the
    quantiles are those of a uniform sample of ``QUANTILE_SAMPLE`` values (Algorithm R), so
    they are exact up to that many values and memory stays bounded beyond."""

    def __init__(self) -> None:
        self.count, self.total, self.low, self.high = 0, 0.0, float("inf"), float("-inf")
        self.sample = np.empty(0)
        self.random = np.random.default_rng(0)  # the same index gives the same figures

    def add(self, values: pa.Array) -> None:
        values = values.drop_null().cast(pa.float64()).to_numpy(zero_copy_only=False)
        if not len(values):
            return
        self.total += float(values.sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        room = max(0, QUANTILE_SAMPLE - len(self.sample))
        self.sample = np.concatenate([self.sample, values[:room]])
        rest = values[room:]
        if len(rest):  # item i (counted from 0) replaces a random sample slot with chance QUANTILE_SAMPLE / (i + 1)
            slots = self.random.integers(0, np.arange(self.count + room, self.count + len(values)) + 1)
            kept = slots < QUANTILE_SAMPLE
            self.sample[slots[kept]] = rest[kept]
        self.count += len(values)

    def result(self) -> dict[str, Any] | None:
        if not self.count:
            return None
        quantiles = np.quantile(self.sample, QUANTILES)  # linear, as pyarrow's quantile
        return {
            "count": self.count,
            "mean": round(self.total / self.count, 4),
            "min": round(self.low, 4),
            **{f"p{round(q * 100)}": round(float(v), 4) for q, v in zip(QUANTILES, quantiles)},
            "max": round(self.high, 4),
        }


def _label_tally(values: pa.Array) -> Counter[str]:
    """A batch's count of each label value, by its text (a nested one's JSON)."""
    if pa.types.is_nested(values.type):  # list, struct, map: value_counts has no kernel for them
        return Counter("None" if v is None else json.dumps(v, sort_keys=True, default=str)
                       for start in range(0, len(values), JSON_SLICE_ROWS)
                       for v in values.slice(start, JSON_SLICE_ROWS).to_pylist())
    return Counter({str(v["values"]): int(v["counts"]) for v in pc.value_counts(values).to_pylist()})


def _top(tally: Counter[str]) -> dict[str, int]:
    counts = sorted(tally.items(), key=lambda item: (-item[1], item[0]))
    top = dict(counts[:MAX_LABEL_VALUES])
    rest = sum(n for _, n in counts[MAX_LABEL_VALUES:])
    return {**top, "(other)": rest} if rest else top


def job_stats(index: JobIndex) -> dict[str, Any]:
    """The statistics of one job's index, as JSON-serialisable data, read a record batch at a
    time (memory grows with the distinct values of a label column, never with the rows);
    duplicates are known only in the final (merged) index."""
    names = index.column_names
    labels = [c for c in names if c not in INDEX_COLUMN_TYPES]
    scores = [c for c in SCORE_COLUMNS if c in names]
    counted = [c for c in ("status", "blank", "duplicate_of") if c in names]
    rows = ok = failed = blank = duplicates = 0
    label_tallies: dict[str, Counter[str]] = {c: Counter() for c in labels}
    distributions = {c: _Distribution() for c in scores}
    for batch in index.batches(counted + scores + labels):
        rows += batch.num_rows
        if "status" in counted:
            ok += _count(pc.equal(batch.column("status"), STATUS_OK))
            failed += _count(pc.equal(batch.column("status"), STATUS_FAILED))
        if "blank" in counted:
            blank += _count(pc.fill_null(batch.column("blank"), False))
        if "duplicate_of" in counted:
            duplicates += _count(pc.is_valid(batch.column("duplicate_of")))
        for column in labels:
            label_tallies[column].update(_label_tally(batch.column(column)))
        for column in scores:
            distributions[column].add(batch.column(column))
    return {
        "rows": rows,
        "ok": ok,
        "failed": failed,
        "blank": blank if "blank" in counted else None,
        "duplicates": duplicates if index.final and "duplicate_of" in counted else None,
        "labels": {c: _top(tally) for c, tally in label_tallies.items()},
        "scores": {c: d for c, d in ((c, distributions[c].result()) for c in scores) if d is not None},
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
