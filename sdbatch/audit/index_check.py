"""``verify``'s checks of the index itself, streamed a record batch at a time in row order: its
row count against ``job.json``, each manifest row once (a count per row, saturating at 2: a
byte per row), its ids against the manifest's and its rows against the shards' commits (both
merge-joins by row: those streams are in row order too), and foreign objects at failed rows'
keys. Also ``RowSample``: rows drawn uniformly in memory of the sample's size. Nothing here
holds more than a batch of each stream and the per-row counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.audit.job_output import JobOutput
from sdbatch.audit.object_check import Findings
from sdbatch.data.index import STATUS_OK
from sdbatch.manifest.sources import ManifestError
from sdbatch.output.commits import committed_shards
from sdbatch.output.documents import JobRecord
from sdbatch.output.index import INDEX_BATCH_ROWS, INDEX_KEY, JobIndex
from sdbatch.storage.base import StorageError

SHOWN = 5  # ids named per problem

#: The columns the index is compared with its commits on.
COMMITTED = ["id", "key", "sha256", "status"]


class _Tally:
    """How many ids a problem concerns, and the first ``SHOWN`` of them."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, ids: list[str]) -> None:
        self.count += len(ids)
        self.first += ids[:SHOWN - len(self.first)]

    def example(self) -> str:
        return ", ".join(self.first)


def _follows(rows: np.ndarray, last: int) -> bool:
    """Whether ``rows`` are in order and none comes before row ``last``."""
    return not len(rows) or bool(rows[0] >= last and np.all(np.diff(rows) >= 0))


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
                self.ordered &= _follows(rows, self._last)
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


def _equal(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Element-wise equality where two nulls are equal."""
    same = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(pc.is_null(a), pc.is_null(b))
    return pc.or_(same, both_null).to_numpy(zero_copy_only=False)


def _pair(index: pa.Table | None, other: pa.Table | None, compared: list[str]) -> tuple[list[str], ...]:
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
    commits. Also counts the rows, failed rows, duplicates and foreign objects."""

    def __init__(self, out: JobOutput, progress: Callable[[str], None] | None = None):
        self.out = out
        self.total = out.job.manifest.num_rows
        self.rows = self.failed = 0
        self.duplicates: Findings[str] = Findings()
        self.foreign: Findings[tuple[str, str]] = Findings()
        self._counts = np.zeros(self.total, dtype=np.uint8)  # index rows per manifest row, up to 2
        self._last = -1
        self.ordered = True
        self._carry: pa.Table | None = None  # rows of the last row number seen: its duplicate may follow
        self._commits = None
        if out.index.final:
            if progress:
                progress("comparing the index with the commits")
            commits = JobIndex(out.storage, out.job.fingerprint, commits=sorted(committed_shards(out.storage), key=int))
            self._commits = _RowStream(commits.batches(["row", *COMMITTED]))
        manifest, self._unchecked = _manifest_ids(out.job)
        self._manifest = None if manifest is None else _RowStream(manifest)
        self.lost, self.differ, self.unknown = _Tally(), _Tally(), _Tally()
        self.absent, self.strangers = _Tally(), _Tally()

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
        self.ordered &= _follows(rows, self._last)
        self._last = max(self._last, int(rows.max()))
        if not self.ordered:  # the merge-joins mean nothing: said in problems()
            self._carry = None
            return
        table = pa.Table.from_batches([batch]).select(["row", *COMMITTED])
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
        before = self._counts[numbers]
        after = np.minimum(before.astype(np.int64) + times, 2)
        self._counts[numbers] = after
        twice = numbers[(before < 2) & (after >= 2)]
        if len(twice):
            at = np.flatnonzero(np.isin(rows, twice))
            self.duplicates.extend(dict.fromkeys(batch.column("id").take(pa.array(at)).to_pylist()))

    def _compare(self, table: pa.Table | None, stop: int | None) -> None:
        """Compare the index rows ``table`` (those before row ``stop``; None: the rest of the
        index) with the commits' and the manifest's rows up to there."""
        if self._commits is not None:
            unknown, differ, _, lost = _pair(table, self._commits.upto(stop), COMMITTED)
            self.unknown.add(unknown)
            self.differ.add(differ)
            self.lost.add(lost)
        if self._manifest is not None:
            try:
                manifest = self._manifest.upto(stop)
            except (ManifestError, StorageError, OSError) as exc:  # the manifest became unreadable part-way
                self._manifest, self._unchecked = None, _unreadable(self.out.job, exc)
                return
            strangers, other_id, held_by_another, absent = _pair(table, manifest, ["id"])
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
        if self._commits is not None and not self._commits.ordered:
            problems.append("the commits are not in row order (a commit holds rows of another shard): the index was "
                            "not compared with them")
        elif self._commits is not None:
            if self.lost.count:
                problems.append(f"{self.lost.count} committed rows are not in {INDEX_KEY} (e.g. {self.lost.example()}); "
                                "rebuild it with --rebuild-index")
            if self.differ.count:
                problems.append(f"{self.differ.count} rows of {INDEX_KEY} differ from their commit (e.g. "
                                f"{self.differ.example()}); rebuild it with --rebuild-index")
            if self.unknown.count:
                problems.append(f"{self.unknown.count} rows of {INDEX_KEY} are in no commit (e.g. {self.unknown.example()})")
        if self._unchecked is not None:
            return [*problems, self._unchecked]
        if self.absent.count and out.finished:
            problems.append(f"{self.absent.count} manifest rows are not in the index (e.g. {self.absent.example()})")
        if self.strangers.count:
            problems.append(f"{self.strangers.count} index rows are not in the manifest (e.g. {self.strangers.example()})")
        return problems


class RowSample:
    """``size`` ok rows drawn uniformly from those streamed past ``add`` (bottom-k sampling:
    each row gets a random key from ``seed`` and ``stream``, the ``size`` smallest are kept), so
    memory is the sample's whatever the index holds. ``stream`` tells apart two samples of one
    seed (the rows read in full and the rows regenerated)."""

    def __init__(self, size: int, seed: int, stream: int):
        self.size = size
        self._random = np.random.default_rng([seed, stream])
        self._keys = np.empty(0)
        self._rows = np.empty(0, dtype=np.int64)
        self._ids = np.empty(0, dtype=object)

    def add(self, batch: pa.RecordBatch) -> None:
        keys = self._random.random(batch.num_rows)  # a key for every row, so the draw follows the rows, not the batches
        ok = pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False)
        self._keys = np.concatenate([self._keys, keys[ok]])
        self._rows = np.concatenate([self._rows, batch.column("row").to_numpy(zero_copy_only=False)[ok]])
        self._ids = np.concatenate([self._ids, np.array(batch.column("id").filter(pa.array(ok)).to_pylist(), dtype=object)])
        if len(self._keys) > self.size:
            keep = np.argpartition(self._keys, self.size - 1)[:self.size] if self.size else np.empty(0, dtype=np.int64)
            self._keys, self._rows, self._ids = self._keys[keep], self._rows[keep], self._ids[keep]

    @property
    def rows(self) -> list[int]:
        return sorted(self._rows.tolist())

    @property
    def ids(self) -> list[str]:
        """The sampled rows' ids, in row order."""
        return [str(i) for _, i in sorted(zip(self._rows.tolist(), self._ids.tolist()))]
