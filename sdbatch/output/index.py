"""Merging the shards' commits into ``index.parquet`` and reading it back."""

from __future__ import annotations

import io
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdbatch.data.index import STATUS_FAILED, index_schema
from sdbatch.errors import JobFailed
from sdbatch.output.commits import (
    FINGERPRINT_META,
    CorruptCommit,
    ForeignCommit,
    commit_stamp,
    committed_shards,
    metadata_key,
    read_shard_index,
)
from sdbatch.output.documents import SUCCESS_KEY, FailedRow
from sdbatch.output.quality import mark_duplicates
from sdbatch.storage.base import NotFound, Storage

log = logging.getLogger("sdbatch.output")


INDEX_KEY = "index.parquet"


#: Shard indexes read ahead of the writer while merging, and the rows gathered into one
#: Parquet row group: together they bound the merge's memory.
MERGE_READ_AHEAD = 8


MERGE_ROW_GROUP_ROWS = 65_536


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
    job_fingerprint: str, duplicate_max_distance: int = 0,
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
    with tempfile.TemporaryDirectory(prefix="sdbatch-index-") as tmp, ThreadPoolExecutor(MERGE_READ_AHEAD) as pool:
        path = Path(tmp) / INDEX_KEY
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            group: list[pa.Table] = []
            for start in range(0, len(shard_names), MERGE_READ_AHEAD):
                names = shard_names[start:start + MERGE_READ_AHEAD]
                read = partial(_read_planned_commit, storage, job_fingerprint=job_fingerprint)
                for name, table in zip(names, pool.map(read, names)):
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
        duplicates = mark_duplicates(path, marked, duplicate_max_distance)
        storage.put_file(INDEX_KEY, marked)
    return IndexSummary(rows=rows, rows_failed=failed, first_failed=first_failed, duplicates=duplicates)


def committed_index(storage: Storage, job_fingerprint: str) -> tuple[pa.Table, int]:
    """The merge of every commit (each checked to carry ``job_fingerprint``), in row order,
    and how many commits that is."""
    names = sorted(committed_shards(storage), key=int)
    tables = [read_shard_index(storage, name, job_fingerprint) for name in names]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return (table.sort_by("row") if "row" in table.column_names else table), len(names)


def read_index(storage: Storage, job_fingerprint: str) -> tuple[pa.Table, int | None]:
    """The final index if written and stamped with ``job_fingerprint`` (and None), else the
    merge of what is committed so far (not written) and how many commits that is."""
    try:
        table = pq.read_table(io.BytesIO(storage.get(INDEX_KEY)))
    except NotFound:
        pass
    except (pa.ArrowInvalid, OSError) as exc:  # a merge cut short: the commits still hold every row
        log.warning("%s is not readable Parquet (%s: %s): reading the shard commits instead; rerun "
                    "`sdbatch submit` to rewrite it", INDEX_KEY, type(exc).__name__, exc)
    else:
        if commit_stamp(table) == job_fingerprint:
            return table, None
        log.warning("%s does not carry this job's fingerprint: reading the shard commits instead", INDEX_KEY)
    return committed_index(storage, job_fingerprint)
