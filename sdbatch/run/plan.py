"""Pure planning: manifest rows → shards → canonical batches; committed shards subtracted.

Rows that can share a GPU batch (same ``Row.batch_key()``) are planned together, so batches
are full even on a manifest that interleaves sizes and samplers (design.md §4.1):

1. each row's batch key is a small integer ``code``, numbered in order of first appearance;
2. the rows of each code, in manifest order, form a *run*; runs come in code order;
3. each run is cut into shards of ``rows_per_shard`` rows; the shorter rest of a run (its
   *tail*) joins the tail shard being filled if it fits there, else it starts the next one;
   tail shards follow the run they were started in.
4. inside a shard, rows are grouped by batch key in order of first appearance and each group
   is cut into ``batch_size`` batches in row order (``canonical_batches``).

So only the last batch of each distinct key is short, and a manifest with one batch key
gives exactly the contiguous row ranges of ``rows_per_shard`` rows it always did (and needs no
key codes at all: ``codes=None``). A shard's rows and batches are a pure function of the
manifest and the spec — the same whatever the workers, order, retries or resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sdbatch.data.row import Row
from sdbatch.manifest.reader import iter_batch_keys
from sdbatch.manifest.sources import Manifest
from sdbatch.output.commits import shard_name
from sdbatch.spec import JobSpec


@dataclass(frozen=True)
class ShardSpec:
    index: int
    rows: range | tuple[int, ...]  # manifest row numbers, in the shard's batch order

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def num_rows(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Plan:
    """Every shard of a job. ``order`` lists the manifest's row numbers shard after shard and
    ``bounds[i]:bounds[i + 1]`` is shard i's slice of it; both are None for a one-key
    manifest, whose shards are plain ranges (no per-row memory for a 10-million-row plan)."""

    num_rows: int
    rows_per_shard: int
    batch_size: int
    order: np.ndarray | None = None
    bounds: np.ndarray | None = None
    num_batches: int = 0  # canonical batches over all shards

    @property
    def num_shards(self) -> int:
        if self.bounds is None:
            return -(-self.num_rows // self.rows_per_shard)
        return len(self.bounds) - 1

    def shard(self, index: int) -> ShardSpec:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} is outside this plan's {self.num_shards} shards")
        if self.order is None or self.bounds is None:  # set together
            start = index * self.rows_per_shard
            return ShardSpec(index, range(start, min(start + self.rows_per_shard, self.num_rows)))
        lo, hi = int(self.bounds[index]), int(self.bounds[index + 1])
        return ShardSpec(index, tuple(int(r) for r in self.order[lo:hi]))

    def pending(self, committed: Iterable[str] = ()) -> PendingShards:
        """Every shard not in ``committed`` (shard names), in order."""
        return PendingShards(self, committed)

    def shard_sizes(self) -> np.ndarray:
        """Rows in each shard."""
        if self.bounds is not None:
            return np.diff(self.bounds)
        sizes = np.full(self.num_shards, self.rows_per_shard, dtype=np.int64)
        if len(sizes):
            sizes[-1] = self.num_rows - self.rows_per_shard * (len(sizes) - 1)
        return sizes

    @property
    def batch_fill(self) -> float:
        """Mean rows per batch ÷ batch size (1.0: every batch full)."""
        return self.num_rows / (self.num_batches * self.batch_size) if self.num_batches else 1.0


class PendingShards(Sequence[ShardSpec]):
    """A plan's shards not in ``committed`` (shard names), in order, held as one integer per
    shard: 156,250 shards (10 million rows at 64) are 1.2 MB whatever is committed, and a
    ``ShardSpec`` is made only when one is asked for."""

    def __init__(self, plan: Plan, committed: Iterable[str] = ()):
        self.plan = plan
        done = np.zeros(plan.num_shards, dtype=bool)
        indices = np.fromiter((int(name) for name in committed), dtype=np.int64)
        done[indices[indices < plan.num_shards]] = True  # a commit outside this plan's shards is not one of them
        self.indices = np.flatnonzero(~done)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> ShardSpec:  # type: ignore[override]
        return self.plan.shard(int(self.indices[position]))

    @property
    def num_rows(self) -> int:
        """Rows in these shards."""
        return int(self.plan.shard_sizes()[self.indices].sum())


def make_plan(num_rows: int, rows_per_shard: int, batch_size: int, codes: Sequence[int] | np.ndarray | None = None) -> Plan:
    """The plan of a manifest whose row i has batch-key code ``codes[i]`` (codes numbered in
    order of first appearance, see ``key_codes``); ``codes=None``: every row has one key."""
    batch = min(batch_size, rows_per_shard)
    if codes is None or num_rows == 0 or int(np.max(codes)) == 0:
        full, rest = divmod(num_rows, rows_per_shard)
        batches = full * -(-rows_per_shard // batch) + -(-rest // batch)
        return Plan(num_rows, rows_per_shard, batch_size, num_batches=batches)
    codes = np.asarray(codes)
    if len(codes) != num_rows:
        raise ValueError(f"{len(codes)} batch-key codes for {num_rows} rows")
    by_key = np.argsort(codes, kind="stable")  # runs, in code order, rows in manifest order
    run_ends = np.cumsum(np.bincount(codes))
    pieces: list[np.ndarray] = []  # shard i's rows, as one or more slices of by_key
    shards: list[list[np.ndarray]] = []
    tail_shard: list[np.ndarray] | None = None
    tail_rows = 0
    batches = 0
    start = 0
    for end in run_ends.tolist():
        run = by_key[start:end]
        start = end
        for lo in range(0, len(run) - len(run) % rows_per_shard, rows_per_shard):
            shards.append([run[lo : lo + rows_per_shard]])
        tail = run[len(run) - len(run) % rows_per_shard :]
        if len(tail):
            if tail_shard is None or tail_rows + len(tail) > rows_per_shard:
                tail_shard, tail_rows = [], 0
                shards.append(tail_shard)
            tail_shard.append(tail)
            tail_rows += len(tail)
    for shard_pieces in shards:
        for piece in shard_pieces:
            batches += -(-len(piece) // batch)
            pieces.append(piece)
    sizes = [sum(len(p) for p in s) for s in shards]
    dtype = np.int32 if num_rows < 2**31 else np.int64
    order = np.concatenate(pieces).astype(dtype, copy=False)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return Plan(num_rows, rows_per_shard, batch_size, order=order, bounds=bounds, num_batches=batches)


def key_codes(keys: Iterable[tuple]) -> np.ndarray:
    """Batch keys → integer codes numbered in order of first appearance."""
    numbers: dict[tuple, int] = {}
    return np.fromiter((numbers.setdefault(k, len(numbers)) for k in keys), dtype=np.int32)


def canonical_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.batch_key(), []).append(row)
    return [
        group[i : i + batch_size]
        for group in groups.values()
        for i in range(0, len(group), batch_size)
    ]


def batch_id(unit: str, number: int) -> str:
    """``00012-003``: batch 3 of shard 00012 (a --retry-failed run's unit names its batches)."""
    return f"{unit}-{number:03d}"


def job_plan(manifest: Manifest, spec: JobSpec) -> Plan:
    """The job's shards and batches: reads every row's batch key (skipped for a manifest with
    no batch-key column) and plans them with ``plan.make_plan``."""
    keys = iter_batch_keys(manifest, spec)
    codes = key_codes(keys) if keys is not None else None
    res = spec.resources
    return make_plan(manifest.num_rows, res.rows_per_shard, res.batch_size, codes)
