"""``verify``'s object checks: a few shards' index rows against their objects, and the sweep for
orphans. A shard's objects are listed once (``Layout.listing_prefixes``; a flat folder of tars once
per hundred shards): a row whose object is not
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
from sdbatch.output.commits import commit_names, shard_name
from sdbatch.output.index import INDEX_KEY, JobIndex
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


SHOWN = 5  # ids named per problem

#: The columns the index is compared with its commits on.
COMMITTED = ["id", "key", "sha256", "status"]


class Tally:
    """How many ids a problem concerns, and the first ``SHOWN`` of them."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, ids: list[str]) -> None:
        self.count += len(ids)
        self.first += ids[:SHOWN - len(self.first)]

    def merge(self, other: Tally) -> None:
        """Add a later row range's tally."""
        self.count += other.count
        self.first += other.first[:SHOWN - len(self.first)]

    def example(self) -> str:
        return ", ".join(self.first)


def follows(rows: np.ndarray, last: int) -> bool:
    """Whether ``rows`` are in order and none comes before row ``last``."""
    return not len(rows) or bool(rows[0] >= last and np.all(np.diff(rows) >= 0))


def _equal(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Element-wise equality where two nulls are equal."""
    same = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(same, both_null).to_numpy(zero_copy_only=False)


def pair_by_row(index: pa.Table | None, other: pa.Table | None, compared: list[str]) -> tuple[list[str], ...]:
    """Index rows and another stream's rows of the same row range, paired by row. The ids of:
    index rows the other lacks; index rows whose ``compared`` columns differ from the other's
    row, and that row's id in the other; the other's rows the index lacks."""
    if index is None or other is None:
        return ([] if index is None else index.column("id").to_pylist()), [], [], \
               ([] if other is None else other.column("id").to_pylist())
    irows = index.column("row").to_numpy(zero_copy_only=False)
    orows = other.column("row").to_numpy(zero_copy_only=False)
    has = np.isin(irows, orows)
    partner = np.searchsorted(orows, irows[has])
    theirs, mine = other.take(pa.array(partner, pa.int64())), index.filter(pa.array(has))
    same = np.ones(len(partner), dtype=bool)
    for name in compared:
        same &= _equal(mine.column(name), theirs.column(name))
    differ = pa.array(~same)
    return (index.column("id").filter(pa.array(~has)).to_pylist(), mine.column("id").filter(differ).to_pylist(),
            theirs.column("id").filter(differ).to_pylist(), other.column("id").filter(pa.array(~np.isin(orows, irows))).to_pylist())


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
class CommitChecks:
    """A task's index rows against its shards' commits, paired by row: the first row they hold
    (to merge tasks' tallies in row order), the ids of index rows in no commit (``unknown``),
    differing from their commit (``differ``), committed rows not indexed (``lost``), and each
    commit's (name, first row, last row, whether in row order)."""

    first_row: int
    unknown: Tally = field(default_factory=Tally)
    differ: Tally = field(default_factory=Tally)
    lost: Tally = field(default_factory=Tally)
    spans: list[tuple[str, int, int, bool]] = field(default_factory=list)


def compare_commits(storage: Storage, job_fingerprint: str, names: list[str], index: pa.Table | None) -> CommitChecks:
    """The index rows ``index`` (row-ordered; None: none) against the commits ``names`` (their
    shards' commits, in shard order), a commit read at a time into one table."""
    tables = []
    found = CommitChecks(first_row=-1)
    for name in names:
        batches = list(JobIndex(storage, job_fingerprint, commits=[name]).batches(["row", *COMMITTED]))
        commit = pa.Table.from_batches(batches) if batches else None
        if commit is None or not commit.num_rows:
            continue
        rows = commit.column("row").to_numpy()
        found.spans.append((name, int(rows[0]), int(rows.max()), follows(rows, -1)))
        tables.append(commit)
    commits = pa.concat_tables(tables) if tables else None
    start = index if index is not None and index.num_rows else commits
    found.first_row = -1 if start is None else int(pc.min(start.column("row")).as_py())
    unknown, differ, _, lost = pair_by_row(index, commits, COMMITTED)
    found.unknown.add(unknown)
    found.differ.add(differ)
    found.lost.add(lost)
    return found


@dataclass
class ShardChecks:
    """What a task found: its index rows, ok rows whose object is intact, rows whose object was
    read, missing (id, key), mismatched (id, key, what) and orphan objects; and, when the index
    is compared with the commits, how its rows agree with their shards' (``commits``)."""

    rows: int = 0
    ok: int = 0
    read: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    commits: CommitChecks | None = None


@dataclass(frozen=True)
class CommitSource:
    """The commits the index is compared with: the committed shards' names and the job's
    fingerprint (each commit's stamp). ``every_shard``: every index row is compared (a row of
    a shard with no commit is in none); False (``--sample``: ``names`` are the sampled rows'
    shards): only the rows of the shards named, each against its commit."""

    names: Collection[str]  # every commit's: a ShardSet (a bit per shard; 156,250 strings were 16 MiB at 10M rows)
    job_fingerprint: str
    every_shard: bool = True

    def of(self, shards: Iterable[str]) -> list[str]:
        """The committed ones of ``shards``, in shard order."""
        return sorted((s for s in shards if s in self.names), key=int)

    def only(self, shards: Iterable[str]) -> CommitSource:
        """These commits narrowed to ``shards``: what a task is sent, not every commit's name."""
        return CommitSource(frozenset(self.of(shards)), self.job_fingerprint, self.every_shard)

    def compared(self, rows: pa.Table) -> pa.Table:
        """The index rows ``rows`` this source compares."""
        if self.every_shard:
            return rows
        return rows.filter(pc.is_in(rows.column("shard"), value_set=pa.array(sorted(self.names), pa.string())))


def check_shards(storage: Storage, layout: Layout, rows: pa.Table, read_rows: Collection[int] | None,
                 threads: int = 16, commits: CommitSource | None = None) -> ShardChecks:
    """Check the index ``rows`` of whole shards against their objects: every ok row's object
    listed (and of its recorded size, where a listing shows it), and the rows of ``read_rows``
    (None: all) read and hashed. Orphans: listed objects of these shards no ok row names. With
    ``commits``, the rows against their shards' commits too."""
    entries = rows.to_pylist()
    shards = {e["shard"] for e in entries}
    listed = {key: size for prefix in layout.listing_prefixes(shards)
              for key, size in storage.list_sizes(prefix) if layout.owner(key) in shards}
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
    # a tar read for a sample of its rows names the others' members too: its orphan members are known only when all are read
    members = checked.orphan_members if len(to_read) == len(ok) else []
    found.orphans = sorted([k for k in listed if k not in named] + members)
    if commits is not None:
        found.commits = compare_commits(storage, commits.job_fingerprint, commits.of(shards), commits.compared(rows))
    return found


def _listed_size(storage: Storage, key: str) -> int | None:
    """The size of the object at ``key`` outside the shards a task lists (an index row naming
    another shard's object), from a listing of it alone."""
    return next((size for listed, size in storage.list_sizes(key) if listed == key), None)


def _remote_check(layout: Layout, rows: pa.Table, read_rows: list[int] | None, threads: int,
                  commits: CommitSource | None) -> ShardChecks:
    """``check_shards`` in a Ray task (the layout arrives pickled with its storage: URL, endpoint)."""
    return check_shards(layout.storage, layout, rows, None if read_rows is None else set(read_rows), threads, commits)


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

    def __iter__(self) -> Iterator[str]:
        """The names, shard numbers first in order."""
        yield from (shard_name(int(n)) for n in np.flatnonzero(self._bits))
        yield from sorted(self._other)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._bits)) + len(self._other)

    def not_in(self, other: ShardSet) -> list[str]:
        """The names in this set and not in ``other``, in shard order."""
        size = max(len(self._bits), len(other._bits))
        mine, theirs = (np.pad(s._bits, (0, size - len(s._bits))) for s in (self, other))
        return [*(shard_name(int(n)) for n in np.flatnonzero(mine & ~theirs)), *sorted(self._other - other._other)]


def listed_commits(storage: Storage) -> ShardSet:
    """The committed shards' names, from one listing of metadata/."""
    committed = ShardSet()
    committed.add(commit_names(storage))
    return committed


def commit_listing_problems(indexed: ShardSet, committed: ShardSet) -> list[str]:
    """``--listing-only``'s (and ``--sample``'s) check of the commits, from their listing
    (``listed_commits``) and no read: every shard the index holds rows of has a commit, and
    every commit's shard is in the index."""
    uncommitted, unindexed = indexed.not_in(committed), committed.not_in(indexed)
    problems = []
    if uncommitted:
        problems.append(f"{len(uncommitted)} shards the index holds rows of have no commit (e.g. {', '.join(uncommitted[:SHOWN])})")
    if unindexed:
        problems.append(f"{len(unindexed)} commits are of shards {INDEX_KEY} holds no row of (e.g. {', '.join(unindexed[:SHOWN])}): "
                        "their rows are not indexed; rebuild it with --rebuild-index")
    return problems


class ShardDispatch:
    """Cuts the ``rows`` index rows, fed in row-ordered batches (``CHECK_COLUMNS``), into tasks
    of whole shards of about ``task_rows`` rows and runs them — ``workers`` Ray tasks at a time, or here when
    ``workers`` is 0 — handing each task's findings to ``on_result`` as it completes.
    ``read_rows``: the rows whose objects are read (None: every row; empty: none). With
    ``commits``, each task compares its rows with their shards' commits, and ``close`` the
    commits of shards the index holds no row of."""

    def __init__(self, layout: Layout, on_result: Callable[[ShardChecks], None], *, workers: int, rows: int,
                 read_rows: Collection[int] | None, threads: int, commits: CommitSource | None = None):
        self.layout, self.on_result, self.workers, self.threads = layout, on_result, workers, threads
        self.commits = commits
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
        if self.commits is not None:  # every row of these commits is lost: compared here, one at a time
            for name in sorted((n for n in self.commits.names if n not in self.shards), key=int):
                found = compare_commits(self.layout.storage, self.commits.job_fingerprint, [name], None)
                self.on_result(ShardChecks(commits=found))

    def _submit(self, table: pa.Table) -> None:
        shards = pc.unique(table.column("shard")).to_pylist()
        self.shards.add(shards)
        commits = None if self.commits is None else self.commits.only(shards)
        read = None
        if self.read_rows is not None:
            rows = table.column("row").to_numpy(zero_copy_only=False)
            inside = self.read_rows[np.searchsorted(self.read_rows, rows.min()):np.searchsorted(self.read_rows, rows.max(), "right")]
            read = inside.tolist()
        if not self.workers:
            self.on_result(check_shards(self.layout.storage, self.layout, table, None if read is None else set(read),
                                        self.threads, commits))
            return
        if self._remote is None:
            import ray

            self._remote = ray.remote(num_cpus=1)(_remote_check)
        while len(self._pending) >= self.workers:
            self._collect()
        self._pending.append(self._remote.remote(self.layout, table, read, self.threads, commits))

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
