"""``verify``'s object checks: a few shards' index rows against their objects, and the sweep for
orphans. A shard's objects are listed once (``Layout.shard_prefix``): a row whose object is not
listed is missing; one whose listed size is not its recorded size is mismatched (files layout);
the rows to read (every one, a sample, or none for a listing-only check) are read and hashed
(``Layout.check``); listed objects no ok row names are orphans. The index is cut into tasks of
whole shards (``ShardDispatch``), run in Ray tasks anywhere on the cluster (every node reads the
storage alike) ``workers`` at a time, or in this process; the driver holds only a task's rows
per worker and merges their findings. ``sweep_orphans`` lists the top-level folders for objects
under no shard of the index. Findings are kept up to ``KEPT`` each, the rest counted."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.data.index import STATUS_OK
from sdbatch.output.commits import shard_name
from sdbatch.output.layout import PREFIXES, Layout, object_key, size_differs
from sdbatch.storage.base import Storage

T = TypeVar("T")

#: Findings of one kind kept in memory; beyond it they are only counted.
KEPT = 10_000

#: Index rows one task checks at most: whole shards, so each shard's objects are listed once,
#: and tasks few enough (10M rows: ~2,500) that scheduling them costs nothing next to their
#: reads. A smaller job is cut into ``TASKS_PER_WORKER`` tasks per worker, to keep every one busy.
TASK_ROWS = 4096
TASKS_PER_WORKER = 4

#: The index columns the object checks need.
CHECK_COLUMNS = ["id", "row", "shard", "status", "key", "bytes", "sha256"]


class Findings(list[T]):
    """A list of findings that keeps the first ``KEPT`` and counts the rest in ``dropped``."""

    def __init__(self, items: Iterable[T] = ()):
        super().__init__()
        self.dropped = 0
        self.extend(items)

    def append(self, item: T) -> None:
        if len(self) < KEPT:
            super().append(item)
        else:
            self.dropped += 1

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    @property
    def total(self) -> int:
        return len(self) + self.dropped


@dataclass
class ShardChecks:
    """What a task found: its index rows, ok rows whose object is intact, rows whose object was
    read, missing (id, key), mismatched (id, key, what) and orphan objects."""

    rows: int = 0
    ok: int = 0
    read: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def check_shards(storage: Storage, layout: Layout, rows: pa.Table, read_rows: Collection[int] | None,
                 threads: int = 16) -> ShardChecks:
    """Check the index ``rows`` of whole shards against their objects: every ok row's object
    listed (and of its recorded size, where a listing shows it), and the rows of ``read_rows``
    (None: all) read and hashed. Orphans: listed objects of these shards no ok row names."""
    entries = rows.to_pylist()
    shards = {e["shard"] for e in entries}
    listed = {key: size for shard in sorted(shards)
              for key, size in storage.list_sizes(layout.shard_prefix(shard)) if layout.owner(key) == shard}
    ok = [e for e in entries if e["status"] == STATUS_OK]
    found = ShardChecks(rows=len(entries))
    to_read = []
    for entry in ok:
        if read_rows is None or entry["row"] in read_rows:
            to_read.append(entry)
            continue
        obj = object_key(entry["key"])
        size = listed.get(obj) if layout.owner(obj) in shards else _listed_size(storage, obj)
        if size is None:
            found.missing.append((entry["id"], entry["key"]))
        elif layout.listed_sizes and size != entry["bytes"]:
            found.mismatched.append((entry["id"], entry["key"], size_differs(size, entry["bytes"])))
        else:
            found.ok += 1
    checked = layout.check(to_read, threads)
    found.read = len(to_read)
    found.ok += len(checked.good)
    found.missing += checked.missing
    found.mismatched += checked.mismatched
    named = layout.objects([e["key"] for e in ok])
    found.orphans = sorted([k for k in listed if k not in named] + checked.orphan_members)
    return found


def _listed_size(storage: Storage, key: str) -> int | None:
    """The size of the object at ``key`` outside the shards a task lists (an index row naming
    another shard's object), from a listing of it alone."""
    return next((size for listed, size in storage.list_sizes(key) if listed == key), None)


def _remote_check(layout: Layout, rows: pa.Table, read_rows: list[int] | None, threads: int) -> ShardChecks:
    """``check_shards`` in a Ray task (the layout arrives pickled with its storage: URL, endpoint)."""
    return check_shards(layout.storage, layout, rows, None if read_rows is None else set(read_rows), threads)


class ShardSet:
    """The names of the shards the index holds rows of: a bit per shard number (names are
    ``commits.shard_name``), a set for any other name."""

    def __init__(self) -> None:
        self._bits = np.zeros(1024, dtype=bool)
        self._other: set[str] = set()

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            number = int(name) if name.isdigit() else -1
            if number < 0 or shard_name(number) != name:
                self._other.add(name)
                continue
            if number >= len(self._bits):
                self._bits = np.concatenate([self._bits, np.zeros(max(number + 1, 2 * len(self._bits)) - len(self._bits), dtype=bool)])
            self._bits[number] = True

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name.isdigit() and shard_name(int(name)) == name:
            return int(name) < len(self._bits) and bool(self._bits[int(name)])
        return name in self._other


class ShardDispatch:
    """Cuts the ``rows`` index rows, fed in row-ordered batches (``CHECK_COLUMNS``), into tasks
    of whole shards of about ``task_rows`` rows and runs them — ``workers`` Ray tasks at a time, or here when
    ``workers`` is 0 — handing each task's findings to ``on_result`` as it completes.
    ``read_rows``: the rows whose objects are read (None: every row; empty: none)."""

    def __init__(self, layout: Layout, on_result: Callable[[ShardChecks], None], *, workers: int, rows: int,
                 read_rows: Collection[int] | None, threads: int):
        self.layout, self.on_result, self.workers, self.threads = layout, on_result, workers, threads
        self.task_rows = max(1, min(TASK_ROWS, -(-rows // (TASKS_PER_WORKER * max(workers, 1)))))
        self.read_rows = None if read_rows is None else np.sort(np.fromiter(read_rows, dtype=np.int64))
        self.shards = ShardSet()
        self._held: list[pa.RecordBatch] = []
        self._pending: list[Any] = []  # Ray object refs of the tasks running
        self._remote: Any = None

    def add(self, batch: pa.RecordBatch) -> None:
        self._held.append(batch)
        if sum(b.num_rows for b in self._held) < self.task_rows:
            return
        table = pa.Table.from_batches(self._held)
        shards = table.column("shard").to_numpy(zero_copy_only=False)
        others = np.flatnonzero(shards != shards[-1])
        if not len(others):  # one shard so far: wait for its end
            return
        cut = int(others[-1]) + 1  # the last shard may go on in the next batch: held back
        self._submit(table.slice(0, cut))
        self._held = table.slice(cut).to_batches()

    def close(self) -> None:
        """Run what is held and wait for every task."""
        table = pa.Table.from_batches(self._held) if self._held else None
        self._held = []
        if table is not None and table.num_rows:
            self._submit(table)
        while self._pending:
            self._collect()

    def _submit(self, table: pa.Table) -> None:
        self.shards.add(pc.unique(table.column("shard")).to_pylist())
        read = None
        if self.read_rows is not None:
            rows = table.column("row").to_numpy(zero_copy_only=False)
            inside = self.read_rows[np.searchsorted(self.read_rows, rows.min()):np.searchsorted(self.read_rows, rows.max(), "right")]
            read = inside.tolist()
        if not self.workers:
            self.on_result(check_shards(self.layout.storage, self.layout, table, None if read is None else set(read), self.threads))
            return
        if self._remote is None:
            import ray

            self._remote = ray.remote(num_cpus=1)(_remote_check)
        while len(self._pending) >= self.workers:
            self._collect()
        self._pending.append(self._remote.remote(self.layout, table, read, self.threads))

    def _collect(self) -> None:
        import ray

        done, self._pending = ray.wait(self._pending, num_returns=1)
        for ref in done:
            self.on_result(ray.get(ref))


def sweep_orphans(storage: Storage, layout: Layout, shards: ShardSet) -> Iterator[str]:
    """Objects under the layouts' folders that no shard of the index owns: listed a folder at a
    time (one delimiter listing of each top-level folder, then the folders no shard owns)."""
    for prefix in PREFIXES:
        ours = prefix == layout.prefix
        for entry in storage.list_folder(prefix):
            owner = layout.owner(entry) if ours else None
            if owner is not None and owner in shards:
                continue
            if entry.endswith("/"):
                yield from (key for key, _ in storage.list_sizes(entry))
            else:
                yield entry
