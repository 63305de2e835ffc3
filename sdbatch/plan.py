"""Pure planning: manifest rows → shards → canonical batches; committed shards subtracted.

A shard is a contiguous range of manifest rows; its id is a pure function of the manifest
and ``rows_per_shard``. Inside a shard, rows are grouped by ``Row.batch_key()`` in order of
first appearance and each group is cut into ``batch_size`` batches in row order — the same
manifest and spec always give the same batches, whatever the workers, order, retries or
resumes (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from sdbatch.manifest import Row


def shard_name(index: int) -> str:
    return f"{index:05d}"


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int  # first manifest row (inclusive)
    stop: int  # last manifest row (exclusive)

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def num_shards(num_rows: int, rows_per_shard: int) -> int:
    return -(-num_rows // rows_per_shard)


def shard(index: int, num_rows: int, rows_per_shard: int) -> ShardSpec:
    start = index * rows_per_shard
    return ShardSpec(index, start, min(start + rows_per_shard, num_rows))


class PendingShards(Sequence[ShardSpec]):
    """The shards not in ``committed`` (shard names), in order, held as one integer per shard:
    a 10-million-row plan at 64 rows per shard is 1.2 MB whatever is committed, and a
    ``ShardSpec`` is made only when one is asked for."""

    def __init__(self, num_rows: int, rows_per_shard: int, committed: Iterable[str] = ()):
        self.total_rows, self.rows_per_shard = num_rows, rows_per_shard
        total = num_shards(num_rows, rows_per_shard)
        done = np.zeros(total, dtype=bool)
        indices = np.fromiter((int(name) for name in committed), dtype=np.int64)
        done[indices[indices < total]] = True  # a commit outside this plan's shards is not one of them
        self.indices = np.flatnonzero(~done)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> ShardSpec:  # type: ignore[override]
        return shard(int(self.indices[position]), self.total_rows, self.rows_per_shard)

    @property
    def num_rows(self) -> int:
        """Rows in these shards (every shard is full but the manifest's last)."""
        last = num_shards(self.total_rows, self.rows_per_shard) - 1
        short = self.rows_per_shard * (last + 1) - self.total_rows
        return len(self.indices) * self.rows_per_shard - (short if len(self.indices) and self.indices[-1] == last else 0)


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
