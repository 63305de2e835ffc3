"""``verify``'s checks of the index itself, streamed a record batch at a time in row order: its
row count against ``job.json``, each manifest row once (a count per row, saturating at 2: two
bits per row), its ids against the manifest's (a merge-join by row: that stream is in row order
too), and foreign objects at failed rows' keys; its rows against the shards' commits are
compared by the object checks' tasks, whose findings are merged here in row order. Also
``RowSample``: rows drawn uniformly in memory of the sample's size. Nothing here holds more than
a batch of each stream, the per-row counts and a few numbers per commit."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.audit.job_output import JobOutput
from sdbatch.audit.object_check import SHOWN, CommitChecks, CommitSource, Findings, Tally, follows, pair_by_row
from sdbatch.data.index import STATUS_OK
from sdbatch.manifest.sources import ManifestError
from sdbatch.output.documents import JobRecord
from sdbatch.output.index import INDEX_BATCH_ROWS, INDEX_KEY
from sdbatch.storage.base import StorageError


class _RowStream:
    """A stream of record batches in row order read alongside the index: ``upto(stop)`` is its
    rows before row ``stop`` (None: all) not yet taken. ``ordered`` turns False when the stream
    is not in row order (then its comparisons mean nothing)."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self._batches = batches
        self._held: pa.RecordBatch | None = None
        self._last = -1
        self.ordered = True

    def upto(self, stop: int | None) -> pa.Table | None:
        taken = []
        while True:
            if self._held is None:
                self._held = next(self._batches, None)
                if self._held is None:
                    break
                rows = self._held.column("row").to_numpy(zero_copy_only=False)
                self.ordered &= follows(rows, self._last)
                self._last = max(self._last, int(rows.max(initial=-1)))
            rows = self._held.column("row").to_numpy(zero_copy_only=False)
            cut = len(rows) if stop is None else int(np.searchsorted(rows, stop))
            if cut:
                taken.append(self._held.slice(0, cut))
            if cut < len(rows):
                self._held = self._held.slice(cut)
                break
            self._held = None
        return pa.Table.from_batches(taken) if taken else None


def _manifest_ids(job: JobRecord) -> tuple[Iterator[pa.RecordBatch] | None, str | None]:
    """The job's manifest's (row, id) in row order, a batch at a time — or, when it is
    unreachable or changed since the job pinned it, None and the problem (the index cannot be
    checked against it)."""
    from sdbatch.data.row import default_row_id
    from sdbatch.manifest.reader import iter_row_batches
    from sdbatch.manifest.sources import open_manifest

    try:
        manifest = open_manifest(job.manifest.source)
    except (ManifestError, StorageError, OSError) as exc:
        return None, _unreadable(job, exc)
    if manifest.fingerprint != job.manifest.fingerprint:
        return None, (f"{_unchecked(job)}: it changed since the job pinned it (fingerprint {manifest.fingerprint}, "
                      f"job.json {job.manifest.fingerprint}); restore it to check the index")

    def batches() -> Iterator[pa.RecordBatch]:
        if "id" not in manifest.columns:
            for start in range(0, manifest.num_rows, INDEX_BATCH_ROWS):
                rows = range(start, min(start + INDEX_BATCH_ROWS, manifest.num_rows))
                yield pa.record_batch({"row": pa.array(rows, pa.int64()), "id": [default_row_id(i) for i in rows]})
            return
        start = 0
        for batch in iter_row_batches(manifest, columns=["id"], batch_size=INDEX_BATCH_ROWS):
            yield pa.record_batch({"row": pa.array(np.arange(start, start + batch.num_rows), pa.int64()),
                                   "id": batch.column(0).cast(pa.string())})
            start += batch.num_rows

    return batches(), None


def _unchecked(job: JobRecord) -> str:
    return f"the index's ids were not checked against the job's manifest {job.manifest.source}"


def _unreadable(job: JobRecord, exc: Exception) -> str:
    return f"{_unchecked(job)}: cannot read it ({exc}); run verify where it is reachable"


class IndexChecks:
    """Fed the index's batches (``object_check.CHECK_COLUMNS``) in row order by ``add``;
    ``problems()`` at the end: how the index disagrees with job.json, the manifest and the
    ``commits`` the tasks compared it with. Also counts the rows, failed rows, duplicates and
    foreign objects."""

    def __init__(self, out: JobOutput, commits: CommitSource | None):
        self.out = out
        self.total = out.job.manifest.num_rows
        self.rows = self.failed = 0
        self.duplicates: Findings[str] = Findings()
        self.foreign: Findings[tuple[str, str]] = Findings()
        self._once, self._twice = _Bits(self.total), _Bits(self.total)  # manifest rows indexed at least once, twice
        self._last = -1
        self.ordered = True
        self._carry: pa.Table | None = None  # rows of the last row number seen: its duplicate may follow
        self.commits = commits  # the commits the object checks' tasks compare the index's rows with (None: none)
        self._spans: list[np.ndarray] = []  # each compared commit's (shard number, first row, last row), a task's at a time
        self._inside = True  # every compared commit's rows in row order
        self._lost, self._differ, self._unknown = _InRowOrder(), _InRowOrder(), _InRowOrder()
        manifest, self._unchecked = _manifest_ids(out.job)
        self._manifest = None if manifest is None else _RowStream(manifest)
        self.absent, self.strangers = Tally(), Tally()

    def add_commits(self, found: CommitChecks) -> None:
        """A task's comparison of its rows with their shards' commits: three numbers kept per
        commit, and the tallies' counts and the ids they may still show (a commit's tuple and
        every task's tallies were ~20 MiB at 10M rows)."""
        if found.spans:
            self._inside &= all(inside for *_, inside in found.spans)
            self._spans.append(np.array([(int(name), first, top) for name, first, top, _ in found.spans], dtype=np.int64))
        self._lost.add(found.first_row, found.lost)
        self._differ.add(found.first_row, found.differ)
        self._unknown.add(found.first_row, found.unknown)

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        self.rows += batch.num_rows
        failed = pc.invert(pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False))
        self.failed += pc.sum(failed).as_py() or 0
        foreign = pc.and_(failed, pc.is_valid(batch.column("key")))
        if pc.any(foreign).as_py():
            self.foreign.extend(zip(batch.column("id").filter(foreign).to_pylist(), batch.column("key").filter(foreign).to_pylist()))
        self._count(batch)
        rows = batch.column("row").to_numpy(zero_copy_only=False)
        self.ordered &= follows(rows, self._last)
        self._last = max(self._last, int(rows.max()))
        if not self.ordered:  # the merge-joins mean nothing: said in problems()
            self._carry = None
            return
        table = pa.Table.from_batches([batch]).select(["row", "id"])
        if self._carry is not None:
            table = pa.concat_tables([self._carry, table])
        rows = table.column("row").to_numpy(zero_copy_only=False)
        cut = int(np.searchsorted(rows, rows[-1]))
        self._carry = table.slice(cut)
        if cut:
            self._compare(table.slice(0, cut), int(rows[-1]))

    def _count(self, batch: pa.RecordBatch) -> None:
        rows = batch.column("row").to_numpy(zero_copy_only=False)
        inside = rows[(rows >= 0) & (rows < self.total)]
        numbers, times = np.unique(inside, return_counts=True)
        before = self._once.get(numbers).astype(np.int64) + self._twice.get(numbers)
        after = np.minimum(before + times, 2)
        self._once.set(numbers)
        self._twice.set(numbers[after >= 2])
        twice = numbers[(before < 2) & (after >= 2)]
        if len(twice):
            at = np.flatnonzero(np.isin(rows, twice))
            self.duplicates.extend(dict.fromkeys(batch.column("id").take(pa.array(at)).to_pylist()))

    def _compare(self, table: pa.Table | None, stop: int | None) -> None:
        """Compare the index rows ``table`` (those before row ``stop``; None: the rest of the
        index) with the manifest's rows up to there."""
        if self._manifest is not None:
            try:
                manifest = self._manifest.upto(stop)
            except (ManifestError, StorageError, OSError) as exc:  # the manifest became unreadable part-way
                self._manifest, self._unchecked = None, _unreadable(self.out.job, exc)
                return
            strangers, other_id, held_by_another, absent = pair_by_row(table, manifest, ["id"])
            self.strangers.add(strangers + other_id)
            self.absent.add(absent + held_by_another)

    def problems(self) -> list[str]:
        """Compare what is left, then say how the index disagrees with job.json, the commits and
        the manifest."""
        if self.ordered:
            self._compare(self._carry if self._carry is not None and self._carry.num_rows else None, None)
        self._carry = None
        out = self.out
        problems = [out.index_error] if out.index_error else []
        if out.finished and self.rows != self.total:
            problems.append(f"{INDEX_KEY} holds {self.rows} rows, the job's manifest {self.total} (job.json); "
                            "rebuild it with --rebuild-index")
        if not self.ordered:
            problems.append(f"{out.index.source} is not in row order: it was not compared with the commits nor the "
                            "manifest; rebuild it with --rebuild-index")
            return problems if self._unchecked is None else [*problems, self._unchecked]
        if self.commits is not None:
            problems += self._commit_problems()
        if self._unchecked is not None:
            return [*problems, self._unchecked]
        if self.absent.count and out.finished:
            problems.append(f"{self.absent.count} manifest rows are not in the index (e.g. {self.absent.example()})")
        if self.strangers.count:
            problems.append(f"{self.strangers.count} index rows are not in the manifest (e.g. {self.strangers.example()})")
        return problems


    def _commits_in_row_order(self) -> bool:
        """Whether each compared commit's rows are in order and after those of every commit before
        it in shard order. A task's spans are in shard order, so the tasks' are walked one at a
        time when their shards do not interleave (else all are sorted at once, in arrival order
        for a shard compared twice)."""
        if not self._inside:
            return False
        tasks = sorted(self._spans, key=lambda spans: int(spans[0, 0]))
        if any(a[-1, 0] >= b[0, 0] for a, b in zip(tasks, tasks[1:])):
            spans = np.concatenate(self._spans)
            tasks = [spans[np.argsort(spans[:, 0], kind="stable")]]
        last = -1  # the last row of the commits walked
        for spans in tasks:
            before = np.maximum(last, np.concatenate([[-1], np.maximum.accumulate(spans[:-1, 2])]))
            if not np.all(spans[:, 1] >= before):
                return False
            last = max(last, int(spans[:, 2].max()))
        return True

    def _commit_problems(self) -> list[str]:
        """The tasks' comparisons with the commits, merged in row order."""
        if not self._commits_in_row_order():
            return ["the commits are not in row order (a commit holds rows of another shard): the index was "
                    "not compared with them"]
        lost, differ, unknown = self._lost.merged(), self._differ.merged(), self._unknown.merged()
        problems = []
        if lost.count:
            problems.append(f"{lost.count} committed rows are not in {INDEX_KEY} (e.g. {lost.example()}); "
                            "rebuild it with --rebuild-index")
        if differ.count:
            problems.append(f"{differ.count} rows of {INDEX_KEY} differ from their commit (e.g. "
                            f"{differ.example()}); rebuild it with --rebuild-index")
        if unknown.count:
            problems.append(f"{unknown.count} rows of {INDEX_KEY} are in no commit (e.g. {unknown.example()})")
        return problems


class _Bits:
    """A bit per number below ``size`` (10M rows: 1.2 MiB; a byte per row held 9.5 MiB)."""

    def __init__(self, size: int):
        self._bytes = np.zeros(-(-size // 8), dtype=np.uint8)

    def get(self, numbers: np.ndarray) -> np.ndarray:
        return ((self._bytes[numbers >> 3] >> (numbers & 7)) & 1).astype(bool)

    def set(self, numbers: np.ndarray) -> None:
        np.bitwise_or.at(self._bytes, numbers >> 3, np.left_shift(1, numbers & 7).astype(np.uint8))  # several in a byte


class _InRowOrder:
    """Tasks' tallies of one kind, arriving in any order (Ray tasks), merged as if in the order
    of their first rows: the counts summed, and only the tallies that can still give one of the
    first ``SHOWN`` ids held."""

    def __init__(self) -> None:
        self.count = 0
        self._held: list[tuple[int, Tally]] = []  # (first row, tally), in row order

    def add(self, first_row: int, tally: Tally) -> None:
        self.count += tally.count
        if not tally.first:
            return
        insort(self._held, (first_row, tally), key=lambda held: held[0])  # after equal rows: in arrival order
        shown = 0
        for at, (_, held) in enumerate(self._held):
            shown += len(held.first)
            if shown >= SHOWN:  # the tallies after it show nothing
                del self._held[at + 1:]
                break

    def merged(self) -> Tally:
        merged = Tally()
        for _, tally in self._held:
            merged.merge(tally)
        merged.count = self.count
        return merged


#: The index columns a ``RowSample`` reads.
SAMPLE_COLUMNS = ["id", "row", "shard", "status"]


class RowSample:
    """``size`` ok rows drawn uniformly from those streamed past ``add`` (``SAMPLE_COLUMNS``;
    bottom-k sampling: each row gets a random key from ``seed`` and ``stream``, the ``size``
    smallest are kept), so memory is the sample's whatever the index holds. ``stream`` tells apart two samples of one
    seed (the rows read in full and the rows regenerated)."""

    def __init__(self, size: int, seed: int, stream: int):
        self.size = size
        self._random = np.random.default_rng([seed, stream])
        self._keys = np.empty(0)
        self._rows = np.empty(0, dtype=np.int64)
        self._ids = np.empty(0, dtype=object)
        self._shards = np.empty(0, dtype=object)

    def add(self, batch: pa.RecordBatch) -> None:
        keys = self._random.random(batch.num_rows)  # a key for every row, so the draw follows the rows, not the batches
        ok = pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False)
        if len(self._keys) >= self.size:  # full: only a key below the largest kept can enter (few ids made per batch)
            ok &= keys < self._keys.max(initial=0.0)
        self._keys = np.concatenate([self._keys, keys[ok]])
        self._rows = np.concatenate([self._rows, batch.column("row").to_numpy(zero_copy_only=False)[ok]])
        taken = pa.array(ok)
        self._ids = np.concatenate([self._ids, np.array(batch.column("id").filter(taken).to_pylist(), dtype=object)])
        self._shards = np.concatenate([self._shards, np.array(batch.column("shard").filter(taken).to_pylist(), dtype=object)])
        if len(self._keys) > self.size:
            keep = np.argpartition(self._keys, self.size - 1)[:self.size] if self.size else np.empty(0, dtype=np.int64)
            self._keys, self._rows, self._ids, self._shards = self._keys[keep], self._rows[keep], self._ids[keep], self._shards[keep]

    @property
    def rows(self) -> list[int]:
        return sorted(self._rows.tolist())

    @property
    def shards(self) -> frozenset[str]:
        """The shards of the sampled rows."""
        return frozenset(str(s) for s in self._shards.tolist())

    @property
    def ids(self) -> list[str]:
        """The sampled rows' ids, in row order."""
        return [str(i) for _, i in sorted(zip(self._rows.tolist(), self._ids.tolist()))]
