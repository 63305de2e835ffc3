"""Merging the shards' commits into ``index.parquet`` and reading it back."""

from __future__ import annotations

import logging
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_FAILED, index_schema
from sdbatch.errors import JobFailed
from sdbatch.output.commits import (
    FINGERPRINT_META,
    CorruptCommit,
    ForeignCommit,
    committed_shards,
    metadata_key,
    read_shard_index,
)
from sdbatch.output.documents import SUCCESS_KEY, FailedRow
from sdbatch.output.quality import DuplicateRule, mark_duplicates
from sdbatch.storage.base import NotFound, Storage

log = logging.getLogger("sdbatch.output")


INDEX_KEY = "index.parquet"


#: Shard indexes read ahead of the writer while merging, and the rows gathered into one
#: Parquet row group: together they bound the merge's memory.
MERGE_READ_AHEAD = 8


#: 16,384 (a reader's batch, ``INDEX_BATCH_ROWS``): 65,536 took the merge's driver to 440–460 MiB
#: (the group concatenated and encoded, then rewritten by ``mark_duplicates``), this 340.
MERGE_ROW_GROUP_ROWS = 16_384


#: Commits a reader of an unfinished job's index reads at once: a GET each, so on S3 the
#: latency of 15,625 commits (1M rows) is paid 4 at a time. Not more: locally the reads are
#: parsing, not waiting, and on 2 loaded cores 8 or 16 threads were slower than one (issue 23).
COMMIT_READ_AHEAD = 4


_Read = TypeVar("_Read")


def _read_ahead(read: Callable[[str], _Read], names: list[str], ahead: int) -> Iterator[tuple[str, _Read]]:
    """``(name, read(name))`` for each of ``names`` in order, ``ahead`` reads in flight at once
    (threads): the reads' latency overlaps, and at most ``ahead`` results are held."""
    with ThreadPoolExecutor(ahead) as pool:
        pending: deque[tuple[str, Any]] = deque()
        for name in names:
            pending.append((name, pool.submit(read, name)))
            if len(pending) >= ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order and types. Linear in the columns: a
    wide manifest's labels are thousands of them (``limits.max_columns``)."""
    present = dict(zip(table.column_names, table.columns))  # ``table.column_names`` is a new list per call
    columns = [present[f.name].cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema).sort_by("row")


def _write_row_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    table = pa.concat_tables(tables)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


@dataclass(frozen=True)
class IndexSummary:
    rows: int
    rows_failed: int
    first_failed: list[FailedRow]  # the first FAILED_ROWS_SHOWN failed rows
    duplicates: int = 0


FAILED_ROWS_SHOWN = 10  # failed rows listed at the end of a job and by `sdbatch status`


def failed_rows_text(failed_rows: list[FailedRow]) -> str:
    """The listing of failed rows the console and ``sdbatch status`` show, one per line."""
    return "\n".join(f"  {row.id}: {row.error}" for row in failed_rows)


class _RowCoverage:
    """The manifest rows the commits read so far hold, one bit per row: an index is written
    only of exactly the manifest's rows, each once, from a commit of every shard read."""

    SHOWN = 5  # rows and shards named per problem

    def __init__(self, num_rows: int):
        self.seen = np.zeros(num_rows, dtype=bool)
        self.problems: list[str] = []
        self.absent: list[str] = []

    def add(self, name: str, table: pa.Table) -> None:
        rows = table.column("row").to_numpy(zero_copy_only=False)
        inside = (rows >= 0) & (rows < len(self.seen))
        first = np.zeros(len(rows), dtype=bool)
        first[np.unique(rows, return_index=True)[1]] = True  # a row twice in one commit is extra too
        extra = ~inside | ~first
        extra[inside & first] = self.seen[rows[inside & first]]
        self.seen[rows[inside]] = True
        if extra.any():
            ids = table.column("id").filter(pa.array(extra)).to_pylist()
            self.problems.append(f"{metadata_key(name)} holds {len(ids)} rows that are not its own "
                                 f"(ids {self._shown(ids)}: outside the manifest or in another commit too)")

    def missing_commit(self, name: str) -> None:
        self.absent.append(name)

    def check(self) -> None:
        """JobFailed naming what is missing or extra, if anything is."""
        problems = list(self.problems)
        if self.absent:
            problems.insert(0, f"no commit of {len(self.absent)} planned shards "
                               f"({self._shown([metadata_key(n) for n in self.absent])} missing)")
        unseen = np.flatnonzero(~self.seen)
        if len(unseen):
            problems.append(f"{len(unseen)} manifest rows are in no commit (rows {self._shown(unseen.tolist())})")
        if problems:
            raise JobFailed(f"the job is not finished: its commits do not hold exactly the manifest's "
                            f"{len(self.seen)} rows, each once: {'; '.join(problems)}. {INDEX_KEY} and {SUCCESS_KEY} "
                            "were not written; move away a commit that is not its shard's, then run the same command "
                            "again: shards without a commit are generated again")

    def _shown(self, items: list[Any]) -> str:
        return ", ".join(map(str, items[:self.SHOWN])) + (f" … (+{len(items) - self.SHOWN} more)" if len(items) > self.SHOWN else "")


def _read_planned_commit(storage: Storage, name: str, job_fingerprint: str) -> pa.Table | None:
    """Shard ``name``'s commit (None: it has none). A file there that is not a readable shard
    index was not written by sdbatch (its commits are written whole, create-once): refused,
    never deleted."""
    try:
        return read_shard_index(storage, name, job_fingerprint)
    except NotFound:
        return None
    except CorruptCommit:
        raise ForeignCommit(
            f"{storage.url}/{metadata_key(name)} is not a shard index sdbatch wrote (not readable Parquet); it is "
            f"not counted as shard {name}'s commit, and sdbatch never deletes a file it did not write. Move it "
            "away, then run the same command again: that shard is generated again"
        ) from None


def merge_index(
    storage: Storage, shard_names: list[str], num_rows: int, passthrough_types: dict[str, pa.DataType],
    job_fingerprint: str, duplicates: DuplicateRule = DuplicateRule(),
) -> IndexSummary:
    """Write the commits of ``shard_names`` (the plan's shards, in order), in row order, as
    ``index.parquet``, one shard at a time through a local temporary file: the driver holds
    ``MERGE_READ_AHEAD`` shard indexes, never the whole index. Nothing is written unless every
    shard has its commit and the commits hold exactly rows 0 … ``num_rows`` - 1, each once
    (``JobFailed`` naming what is missing or extra). ``duplicate_of`` is then filled in from
    that file (``quality.mark_duplicates``, bounded memory too). Idempotent: an interrupted
    merge is simply redone."""
    schema = index_schema(passthrough_types).with_metadata({FINGERPRINT_META: job_fingerprint.encode()})
    rows = failed = 0
    first_failed: list[FailedRow] = []
    coverage = _RowCoverage(num_rows)
    read = partial(_read_planned_commit, storage, job_fingerprint=job_fingerprint)
    with tempfile.TemporaryDirectory(prefix="sdbatch-index-") as tmp:
        path = Path(tmp) / INDEX_KEY
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            group: list[pa.Table] = []
            for name, table in _read_ahead(read, shard_names, MERGE_READ_AHEAD):
                if table is None:
                    coverage.missing_commit(name)
                    continue
                coverage.add(name, table)
                group.append(_conform(table, schema))
                rows += table.num_rows
                failures = table.filter(pc.equal(table.column("status"), STATUS_FAILED))
                failed += failures.num_rows
                shown = failures.select(["id", "error"]).slice(0, FAILED_ROWS_SHOWN - len(first_failed))
                first_failed += [FailedRow(**row) for row in shown.to_pylist()]
                if sum(t.num_rows for t in group) >= MERGE_ROW_GROUP_ROWS:
                    _write_row_group(writer, group)
                    group = []
            coverage.check()
            if group or not rows:
                _write_row_group(writer, group or [schema.empty_table()])
        marked = Path(tmp) / f"marked-{INDEX_KEY}"
        found = mark_duplicates(path, marked, duplicates)
        storage.put_file(INDEX_KEY, marked)
    return IndexSummary(rows=rows, rows_failed=failed, first_failed=first_failed, duplicates=found)


#: Rows per record batch a ``JobIndex`` yields: what a reader of the index holds at once.
INDEX_BATCH_ROWS = 16_384

#: Rows per batch ``JobIndex.rows`` decodes of a row group holding a wanted row (every column).
LOOKUP_BATCH_ROWS = 1_024


class JobIndex:
    """A job's index, read a slice at a time so no reader's memory grows with the job's rows:
    ``index.parquet`` a record batch at a time (through ``Storage.open_read``: ranged reads on
    S3), or — while the job is unfinished, or its index is not its own — the shards' commits
    in shard order, ``COMMIT_READ_AHEAD`` read at once. Either way the rows come in manifest-row order. Opened by
    ``open_index``; ``problem`` says why ``index.parquet`` was passed over, if it was."""

    def __init__(self, storage: Storage, job_fingerprint: str, *, file: pq.ParquetFile | None = None,
                 commits: list[str] | None = None, problem: str | None = None):
        self.storage, self.job_fingerprint, self.problem = storage, job_fingerprint, problem
        self._file, self._commits = file, commits or []
        self._commit_rows: int | None = None

    @property
    def final(self) -> bool:
        """Whether this is the job's own ``index.parquet`` (not the commits so far)."""
        return self._file is not None

    @property
    def source(self) -> str:
        return INDEX_KEY if self._file is not None else f"{len(self._commits)} committed shard indexes"

    @property
    def num_rows(self) -> int:
        if self._file is not None:
            return self._file.metadata.num_rows
        if self._commit_rows is None:
            self._commit_rows = sum(batch.num_rows for batch in self.batches(["row"]))
        return self._commit_rows

    @property
    def schema(self) -> pa.Schema | None:
        """``index.parquet``'s Arrow schema; None while the index is the commits (each commit's
        types are its own: a column all null in one is typed null there)."""
        return self._file.schema_arrow if self._file is not None else None

    @property
    def column_names(self) -> list[str]:
        """The index's columns (while unfinished: its first commit's, as the merge writes them)."""
        if self._file is not None:
            return self._file.schema_arrow.names
        if not self._commits:
            return []
        return read_shard_index(self.storage, self._commits[0], self.job_fingerprint).column_names

    def batches(self, columns: list[str] | None = None, rows: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
        """The index's rows in row order, ``INDEX_BATCH_ROWS`` at most per batch; ``columns``
        (default all) in that order, a column a commit lacks as nulls of the index's type.
        ``rows`` (first, last): only the rows numbered first … last, reading only the row
        groups whose ``row`` statistics reach into that range (an export shard's slice)."""
        if rows is None:
            yield from self._all_batches(columns)
            return
        first, last = rows
        wanted = columns if columns is None or "row" in columns else [*columns, "row"]
        for batch in self._all_batches(wanted, rows):
            numbers = batch.column("row")
            inside = pc.and_(pc.greater_equal(numbers, first), pc.less_equal(numbers, last))
            if pc.any(inside).as_py():
                batch = batch.filter(inside)
                yield batch if wanted is columns else batch.select(columns)

    def _all_batches(self, columns: list[str] | None, rows: tuple[int, int] | None = None) -> Iterator[pa.RecordBatch]:
        if self._file is not None:
            groups = list(range(self._file.num_row_groups))
            if rows is not None:
                groups = [g for g in groups if _may_reach(self._file.metadata.row_group(g), "row", *rows)]
            if groups:
                yield from self._file.iter_batches(batch_size=INDEX_BATCH_ROWS, row_groups=groups, columns=columns)
            return
        read = partial(read_shard_index, self.storage, job_fingerprint=self.job_fingerprint)
        for _, table in _read_ahead(read, self._commits, COMMIT_READ_AHEAD):
            if table.num_rows:
                yield from _commit_columns(table.sort_by("row"), columns).to_batches(INDEX_BATCH_ROWS)

    def rows(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The index rows whose id is one of ``ids``, as plain values, by id (the last, should an
        id be indexed twice). Reads the ``id`` column a row group at a time (groups whose
        statistics rule the ids out are skipped), then the rows of only the groups that hold
        a wanted row, a batch at a time."""
        wanted = pa.array(sorted(set(ids)), pa.string())
        found: dict[str, dict[str, Any]] = {}
        if not len(wanted):
            return found
        if self._file is not None:
            for group in range(self._file.num_row_groups):
                if not _may_hold(self._file.metadata.row_group(group), wanted):
                    continue
                ids_here = self._file.read_row_group(group, columns=["id"]).column("id")
                at = np.flatnonzero(pc.is_in(ids_here, value_set=wanted).to_numpy(zero_copy_only=False))
                if not len(at):
                    continue
                # the group's rows LOOKUP_BATCH_ROWS at a time, up to the last wanted one: 16,384
                # rows of every column decoded at once were ~100 MiB, whatever the job's size
                start = 0
                for batch in self._file.iter_batches(batch_size=LOOKUP_BATCH_ROWS, row_groups=[group]):
                    inside = at[(at >= start) & (at < start + batch.num_rows)] - start
                    if len(inside):
                        found.update((row["id"], row) for row in batch.take(pa.array(inside)).to_pylist())
                    start += batch.num_rows
                    if start > at[-1]:
                        break
            return found
        for batch in self.batches():
            mask = pc.is_in(batch.column("id"), value_set=wanted)
            if pc.any(mask).as_py():
                found.update((row["id"], row) for row in batch.filter(mask).to_pylist())
        return found


def _min_max(group: pq.RowGroupMetaData, name: str) -> tuple[Any, Any] | None:
    """A row group's statistics of column ``name`` (None: it has none)."""
    column = next((group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == name), None)
    stats = column.statistics if column is not None else None
    return (stats.min, stats.max) if stats is not None and stats.has_min_max else None


def _may_hold(group: pq.RowGroupMetaData, wanted: pa.Array) -> bool:
    """Whether a row group's ``id`` statistics allow one of ``wanted`` (sorted) in it."""
    bounds = _min_max(group, "id")
    return bounds is None or any(bounds[0] <= w <= bounds[1] for w in wanted.to_pylist())


def _may_reach(group: pq.RowGroupMetaData, name: str, first: Any, last: Any) -> bool:
    """Whether a row group's statistics of ``name`` allow a value in first … last."""
    bounds = _min_max(group, name)
    return bounds is None or (bounds[0] <= last and bounds[1] >= first)


def _commit_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """A commit's ``columns`` with the index's types (a commit infers its types from its values)."""
    names = columns if columns is not None else table.column_names
    present = dict(zip(table.column_names, table.columns))
    arrays = []
    for name in names:
        index_type = INDEX_COLUMN_TYPES.get(name)
        if name in present:
            arrays.append(present[name].cast(index_type) if index_type is not None else present[name])
        else:
            arrays.append(pa.nulls(table.num_rows, index_type or pa.null()))
    return pa.Table.from_arrays(arrays, names=list(names))


def open_index(storage: Storage, job_fingerprint: str) -> JobIndex:
    """The final index when it is written and stamped with ``job_fingerprint``, else the commits
    so far (``JobIndex.problem`` says why the final one was passed over, when it is there).
    Raises ``OutputMismatch`` when a commit is another job's."""
    problem = None
    try:
        # pre_buffer off: on, Arrow fetches every row group an ``iter_batches`` names up front —
        # the whole file — instead of a row group's columns at a time
        file = pq.ParquetFile(storage.open_read(INDEX_KEY), pre_buffer=False)
    except NotFound:
        pass
    except (pa.ArrowInvalid, OSError) as exc:  # a merge cut short: the commits still hold every row
        problem = f"{INDEX_KEY} is not readable Parquet ({exc})"
    else:
        if (file.schema_arrow.metadata or {}).get(FINGERPRINT_META) == job_fingerprint.encode():
            return JobIndex(storage, job_fingerprint, file=file)
        problem = f"{INDEX_KEY} does not carry this job's fingerprint"
    return JobIndex(storage, job_fingerprint, commits=sorted(committed_shards(storage), key=int), problem=problem)
