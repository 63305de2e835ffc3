"""A shard's commit: its index written create-once under ``metadata/``, stamped with the job's
fingerprint, read back and checked (design.md §5.3)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.errors import BadInput, JobFailed
from sdbatch.storage.base import Storage

METADATA_PREFIX = "metadata/"


#: Parquet key-value metadata of every commit (and of the index): the job that wrote it
FINGERPRINT_META = b"sdbatch.job_fingerprint"


class OutputMismatch(BadInput, ValueError):
    """OUT already holds a different job, or objects this job did not write."""


class ForeignCommit(OutputMismatch):
    """A commit (metadata/NNNNN.parquet) that does not carry this job's fingerprint."""


def shard_name(index: int) -> str:
    return f"{index:05d}"


def metadata_key(shard_name: str) -> str:
    return f"{METADATA_PREFIX}{shard_name}.parquet"


def committed_shards(storage: Storage, num_shards: int | None = None) -> set[str]:
    """Names of committed shards, from a listing of metadata/ only. Only a name the plan makes
    (``plan.shard_name``: ``00000`` … below ``num_shards`` when known) is a commit: another file
    there (a ``summary.parquet`` some tool left, a copy at ``0.parquet``) is not a shard."""
    return set(commit_names(storage, num_shards))


def count_committed(storage: Storage, num_shards: int | None = None) -> int:
    """How many shards are committed (``committed_shards``' rule), their names never held: at
    10M rows the set of 156,250 names was ~25 MiB of a reader that only counts them."""
    return sum(1 for _ in commit_names(storage, num_shards))


def commit_names(storage: Storage, num_shards: int | None = None) -> Iterator[str]:
    """The committed shards' names (``committed_shards``' rule) as a delimiter listing of
    metadata/ gives them: a page at a time on S3."""
    for key in storage.list_folder(METADATA_PREFIX):
        name = key[len(METADATA_PREFIX) : -len(".parquet")] if key.endswith(".parquet") else ""
        if name.isascii() and name.isdigit() and shard_name(int(name)) == name and (num_shards is None or int(name) < num_shards):
            yield name


def table_to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def records_to_parquet(records: list[dict[str, Any]], schema: pa.Schema, job_fingerprint: str) -> bytes:
    """A shard index's bytes, typed by ``schema`` (``index_schema``): a column that is null
    throughout one shard (``strength`` in a text-to-image shard) still has its declared type;
    stamped with the fingerprint of the job that wrote it."""
    undeclared = sorted(set().union(*records) - set(schema.names))
    if undeclared:  # a new index column must be declared in INDEX_COLUMN_TYPES, not dropped
        raise ValueError(f"index rows carry columns the index schema does not declare: {', '.join(undeclared)}")
    stamped = schema.with_metadata({FINGERPRINT_META: job_fingerprint.encode()})
    return table_to_parquet(pa.Table.from_pylist(records, schema=stamped))


@dataclass(frozen=True)
class Commit:
    """A shard's committed index rows and the storage tag of the commit they were read from."""

    records: list[dict[str, Any]]
    tag: str


def read_commit(storage: Storage, shard_name: str, job_fingerprint: str) -> Commit:
    """A commit and its tag, only if it carries ``job_fingerprint`` (ForeignCommit otherwise;
    CorruptCommit if it is not readable Parquet)."""
    data, tag = storage.get_tagged(metadata_key(shard_name))
    return Commit(_own_commit(storage, shard_name, data, job_fingerprint).to_pylist(), tag)


def commit_shard(
    storage: Storage, shard_name: str, records: list[dict[str, Any]], schema: pa.Schema, job_fingerprint: str,
    replacing: Commit | None = None,
) -> bool:
    """Write the shard index — the commit — typed by ``schema`` and stamped with
    ``job_fingerprint``. A new shard's is create-once: False if an earlier attempt of this job
    had already committed it (its index stays, ours is dropped; ForeignCommit if the commit
    there is not this job's). ``replacing`` (--retry-failed) is the commit read before its
    failed rows were regenerated: it is replaced by compare-and-swap, False if it changed
    meanwhile (a concurrent attempt replaced it first; that one stays)."""
    data = records_to_parquet(records, schema, job_fingerprint)
    if replacing is None:
        created = storage.put_new(metadata_key(shard_name), data).created
        if not created:
            read_shard_index(storage, shard_name, job_fingerprint)
        return created
    return storage.replace_if(metadata_key(shard_name), data, replacing.tag) is not None


class CorruptCommit(JobFailed):
    """A shard's commit that is not readable Parquet (truncated, overwritten by another tool)."""

    def __init__(self, shard_name: str, cause: Exception):
        super().__init__(f"{metadata_key(shard_name)} is not a readable shard index ({type(cause).__name__}: "
                         f"{cause}): shard {shard_name} is treated as uncommitted")
        self.shard_name = shard_name


def _own_commit(storage: Storage, shard_name: str, data: bytes, job_fingerprint: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptCommit(shard_name, exc) from None
    found = commit_stamp(table)
    if found != job_fingerprint:
        key = metadata_key(shard_name)
        raise ForeignCommit(
            f"{storage.url}/{key} was not written by this job (it carries fingerprint {found or 'none'!r}, "
            f"the job is {job_fingerprint}); sdbatch trusts only its own commits. Delete it (or choose another "
            "--out) and run the same command again"
        )
    return table


def read_shard_index(storage: Storage, shard_name: str, job_fingerprint: str) -> pa.Table:
    """A commit, only if it carries ``job_fingerprint`` (ForeignCommit otherwise; CorruptCommit
    if it is not readable Parquet)."""
    return _own_commit(storage, shard_name, storage.get(metadata_key(shard_name)), job_fingerprint)


def stamped_table(data: bytes, job_fingerprint: str) -> pa.Table | None:
    """The Parquet table in ``data`` if it carries ``job_fingerprint``, else None."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError):
        return None
    return table if commit_stamp(table) == job_fingerprint else None


def commit_stamp(table: pa.Table) -> str:
    """The job fingerprint a commit or index carries ('' for none)."""
    return (table.schema.metadata or {}).get(FINGERPRINT_META, b"").decode()
