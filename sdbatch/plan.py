"""Pure planning: manifest rows → shards → canonical batches; committed shards subtracted.

A shard is a contiguous range of manifest rows; its id is a pure function of the manifest
and ``rows_per_shard``. Inside a shard, rows are grouped by ``Row.batch_key()`` in order of
first appearance and each group is cut into ``batch_size`` batches in row order — the same
manifest and spec always give the same batches, whatever the workers, order, retries or
resumes (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


def pending_shards(num_rows: int, rows_per_shard: int, committed: Iterable[str] = ()) -> Iterator[ShardSpec]:
    """Every shard not in ``committed`` (a set of shard names), lazily and in order: a
    10-million-row plan costs no memory beyond the committed set."""
    done = set(committed)
    for index in range(num_shards(num_rows, rows_per_shard)):
        if shard_name(index) not in done:
            yield shard(index, num_rows, rows_per_shard)


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
