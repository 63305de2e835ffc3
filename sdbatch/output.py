"""The output layout and commit protocol (DESIGN §4).

    OUT/_sdbatch/job.json        the job record, written first
    OUT/_sdbatch/lock.json       the running driver's lease
    OUT/_sdbatch/progress.json   progress snapshot
    OUT/images/NNNNN/<id>.<ext>  format=files        | OUT/shards/NNNNN.tar  format=webdataset
    OUT/metadata/NNNNN.parquet   the shard index — written last: it IS the shard's commit
    OUT/index.parquet            all shard indexes merged, once every shard is committed
    OUT/_SUCCESS                 JSON summary, written last of all

A shard is done exactly when its metadata file exists; readers trust metadata, never a
listing of images/. Everything here works on any ``Storage`` and needs no Ray.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import sdbatch
from sdbatch.columns import RESULT_COLUMNS, index_types
from sdbatch.errors import BadInput, JobFailed
from sdbatch.manifest import Manifest
from sdbatch.quality import QUALITY_COLUMN_TYPES, mark_duplicates
from sdbatch.spec import JobSpec, fingerprint
from sdbatch.storage import NotFound, Storage

log = logging.getLogger("sdbatch.output")

JOB_KEY = "_sdbatch/job.json"
LOCK_KEY = "_sdbatch/lock.json"
PROGRESS_KEY = "_sdbatch/progress.json"
METADATA_PREFIX = "metadata/"
IMAGES_PREFIX = "images/"
TARS_PREFIX = "shards/"
INDEX_KEY = "index.parquet"
SUCCESS_KEY = "_SUCCESS"
REPORT_KEY = "report.html"

STATUS_OK = "ok"
STATUS_FAILED = "failed"


class OutputMismatch(BadInput, ValueError):
    """OUT already holds a different job."""


def image_key(shard_name: str, row_id: str, ext: str) -> str:
    return f"{IMAGES_PREFIX}{shard_name}/{row_id}.{ext}"


def tar_key(shard_name: str) -> str:
    return f"{TARS_PREFIX}{shard_name}.tar"


def metadata_key(shard_name: str) -> str:
    return f"{METADATA_PREFIX}{shard_name}.parquet"


def webdataset_key(row_id: str) -> str:
    """webdataset splits a member name at its first dot, so dots in ids are escaped."""
    return row_id.replace(".", "%2E")


def committed_shards(storage: Storage) -> set[str]:
    """Names of committed shards, from a listing of metadata/ only. Only ``NNNNN.parquet``
    is a commit: another file there (a ``summary.parquet`` some tool left) is not a shard."""
    names = (key[len(METADATA_PREFIX) : -len(".parquet")] for key in storage.list(METADATA_PREFIX) if key.endswith(".parquet"))
    return {name for name in names if name.isdigit()}


def build_webdataset_tar(members: list[tuple[str, bytes, bytes]], image_ext: str) -> bytes:
    """A deterministic tar (fixed mtimes/owners, row order) of ``<key>.<ext>`` + ``<key>.json``
    so a retried shard produces the same bytes and adopts an earlier attempt's object."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, image_bytes, json_bytes in members:
            for name, data in ((f"{key}.{image_ext}", image_bytes), (f"{key}.json", json_bytes)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def table_to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def records_to_parquet(records: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    """A shard index's bytes, typed by ``schema`` (``index_schema``): a column that is null
    throughout one shard (``strength`` in a text-to-image shard) still has its declared type."""
    undeclared = sorted(set().union(*records) - set(schema.names))
    if undeclared:  # a new index column must be declared in INDEX_COLUMN_TYPES, not dropped
        raise ValueError(f"index rows carry columns the index schema does not declare: {', '.join(undeclared)}")
    return table_to_parquet(pa.Table.from_pylist(records, schema=schema))


@dataclass(frozen=True)
class Commit:
    """A shard's committed index rows and the storage tag of the commit they were read from."""

    records: list[dict[str, Any]]
    tag: str


def read_commit(storage: Storage, shard_name: str) -> Commit:
    data, tag = storage.get_tagged(metadata_key(shard_name))
    return Commit(pq.read_table(io.BytesIO(data)).to_pylist(), tag)


def commit_shard(
    storage: Storage, shard_name: str, records: list[dict[str, Any]], schema: pa.Schema,
    replacing: Commit | None = None,
) -> bool:
    """Write the shard index — the commit — typed by ``schema``. A new shard's is create-once:
    False if an earlier attempt had already committed it (its index stays, ours is dropped).
    ``replacing`` (--retry-failed) is the commit read before its failed rows were regenerated:
    it is replaced by compare-and-swap, False if it changed meanwhile (a concurrent attempt
    replaced it first; that one stays)."""
    data = records_to_parquet(records, schema)
    if replacing is None:
        return storage.put_new(metadata_key(shard_name), data).created
    return storage.replace_if(metadata_key(shard_name), data, replacing.tag) is not None


class CorruptCommit(JobFailed):
    """A shard's commit that is not readable Parquet (truncated, overwritten by another tool)."""

    def __init__(self, shard_name: str, cause: Exception):
        super().__init__(f"{metadata_key(shard_name)} is not a readable shard index ({type(cause).__name__}: "
                         f"{cause}): shard {shard_name} is treated as uncommitted")
        self.shard_name = shard_name


def read_shard_index(storage: Storage, shard_name: str) -> pa.Table:
    data = storage.get(metadata_key(shard_name))
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptCommit(shard_name, exc) from None


def _committed_index(storage: Storage) -> pa.Table:
    """Every committed shard index, concatenated in row order."""
    names = sorted(committed_shards(storage), key=int)
    tables = [read_shard_index(storage, name) for name in names]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return table.sort_by("row") if "row" in table.column_names else table


#: The index's own columns and their types, in index order; passthrough columns follow with
#: their manifest types. A shard index infers its types from its values, so a column that is
#: null throughout one shard (``strength`` in a text-to-image shard) is typed here.
INDEX_COLUMN_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(), "row": pa.int64(), **{name: t for name, t in index_types().items() if name != "id"},
    **RESULT_COLUMNS, **QUALITY_COLUMN_TYPES,
}
#: Shard indexes read ahead of the writer while merging, and the rows gathered into one
#: Parquet row group: together they bound the merge's memory.
MERGE_READ_AHEAD = 8
MERGE_ROW_GROUP_ROWS = 65_536


def index_schema(passthrough_types: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([*INDEX_COLUMN_TYPES.items(), *passthrough_types.items()])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema).sort_by("row")


def _write_row_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    table = pa.concat_tables(tables)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


@dataclass(frozen=True)
class IndexSummary:
    rows: int
    rows_failed: int
    first_failed: list[dict[str, str]]  # {"id", "error"} of the first FAILED_ROWS_SHOWN failed rows
    duplicates: int = 0


FAILED_ROWS_SHOWN = 10  # failed rows listed at the end of a job and by `sdbatch status`


def failed_rows_text(failed_rows: list[dict[str, str]]) -> str:
    """The listing of failed rows the console and ``sdbatch status`` show, one per line."""
    return "\n".join(f"  {row['id']}: {row['error']}" for row in failed_rows)


def merge_index(storage: Storage, passthrough_types: dict[str, pa.DataType], duplicate_max_distance: int = 0) -> IndexSummary:
    """Write every committed shard index, in row order, as ``index.parquet``, one shard at a
    time through a local temporary file: the driver holds ``MERGE_READ_AHEAD`` shard indexes,
    never the whole index. Shards cover consecutive row ranges, so shard order is row order.
    ``duplicate_of`` is then filled in from that file (``quality.mark_duplicates``, bounded
    memory too). Idempotent: an interrupted merge is simply redone."""
    names = sorted(committed_shards(storage), key=int)
    schema = index_schema(passthrough_types)
    rows = failed = 0
    first_failed: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="sdbatch-index-") as tmp, ThreadPoolExecutor(MERGE_READ_AHEAD) as pool:
        path = Path(tmp) / INDEX_KEY
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            group: list[pa.Table] = []
            for start in range(0, len(names), MERGE_READ_AHEAD):
                for table in pool.map(partial(read_shard_index, storage), names[start:start + MERGE_READ_AHEAD]):
                    group.append(_conform(table, schema))
                    rows += table.num_rows
                    failures = table.filter(pc.equal(table.column("status"), STATUS_FAILED))
                    failed += failures.num_rows
                    first_failed += failures.select(["id", "error"]).slice(0, FAILED_ROWS_SHOWN - len(first_failed)).to_pylist()
                    if sum(t.num_rows for t in group) >= MERGE_ROW_GROUP_ROWS:
                        _write_row_group(writer, group)
                        group = []
            if group or not rows:
                _write_row_group(writer, group or [schema.empty_table()])
        marked = Path(tmp) / f"marked-{INDEX_KEY}"
        duplicates = mark_duplicates(path, marked, duplicate_max_distance)
        storage.put_file(INDEX_KEY, marked)
    return IndexSummary(rows=rows, rows_failed=failed, first_failed=first_failed, duplicates=duplicates)


def read_index(storage: Storage) -> tuple[pa.Table, int | None]:
    """The final index if written (and None), else the merge of what is committed so far (not
    written) and how many shard indexes that is."""
    try:
        return pq.read_table(io.BytesIO(storage.get(INDEX_KEY))), None
    except NotFound:
        pass
    except (pa.ArrowInvalid, OSError) as exc:  # a merge cut short: the commits still hold every row
        log.warning("%s is not readable Parquet (%s: %s): reading the shard commits instead; rerun "
                    "`sdbatch submit` to rewrite it", INDEX_KEY, type(exc).__name__, exc)
    table = _committed_index(storage)
    return table, len(table.column("shard").unique()) if table.num_rows else 0


class CorruptState(BadInput):
    """One of OUT's job-state files is not the JSON sdbatch wrote (truncated, edited, another tool's)."""


#: How to recover from each job-state file being unreadable.
_RECOVERY = {
    JOB_KEY: "it records which job OUT holds: restore it, or start over with `sdbatch submit … --new-run`",
    LOCK_KEY: "it is the driver's lease: once no driver is running, remove it with `sdbatch unlock OUT --force`",
    PROGRESS_KEY: "it is only a progress snapshot: delete it, the next run rewrites it",
    SUCCESS_KEY: "it is the finished job's summary: delete it and rerun the same command to rewrite it",
}


def parse_json(storage: Storage, key: str, data: bytes) -> dict[str, Any]:
    """A job-state document's content, or CorruptState naming the file and the recovery."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        doc = exc
    if not isinstance(doc, dict):
        raise CorruptState(f"{storage.url}/{key} is corrupt (not a JSON object: {str(doc)[:80]}); "
                           f"{_RECOVERY.get(key, 'delete it')}")
    return doc


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return parse_json(storage, key, storage.get(key))
    except NotFound:
        return None


def write_json(storage: Storage, key: str, data: dict[str, Any]) -> None:
    storage.put(key, json.dumps(data, indent=2, sort_keys=True).encode())


def job_record(spec: JobSpec, manifest: Manifest, model_fingerprint: str | None,
               lora_sha256: dict[str, str] | None = None) -> dict[str, Any]:
    """``_sdbatch/job.json``. Its fingerprint covers everything that decides the images and
    where rows land — spec settings, manifest content, model weights, LoRA adapters' bytes —
    so a resume with any of them changed is refused rather than mixing two jobs in one OUT."""
    lora_sha256 = lora_sha256 or {}
    return {
        "fingerprint": fingerprint({
            "spec": spec.fingerprint_fields(), "manifest": manifest.fingerprint,
            "rows": manifest.num_rows, "model": model_fingerprint,
            **({"loras": lora_sha256} if lora_sha256 else {}),
        }),
        "loras": {name: {"path": spec.loras[name], "sha256": sha} for name, sha in lora_sha256.items()},
        "spec": spec.model_dump(mode="json"),
        "manifest": {"source": manifest.source, "fingerprint": manifest.fingerprint,
                     "num_rows": manifest.num_rows, "files": list(manifest.files)},
        "model": {"name": spec.model.name, "fingerprint": model_fingerprint},
        "sdbatch_version": sdbatch.__version__,
        "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


#: What a job writes under OUT, in the order ``clear_job`` deletes it: the commits first and
#: job.json last, so an interrupted clear leaves a state of the old job that still resumes
#: (job.json names it; its uncommitted shards are simply redone), and a new job is claimed
#: only once no image of the old one is left for it to adopt under the same key.
JOB_PARTS_IN_DELETE_ORDER = (
    METADATA_PREFIX, INDEX_KEY, SUCCESS_KEY, REPORT_KEY, IMAGES_PREFIX, TARS_PREFIX, PROGRESS_KEY, JOB_KEY,
)


def clear_job(storage: Storage) -> int:
    """Delete every object a job wrote under OUT (not the lock: the caller holds it; not files
    of the user's own there). Returns how many objects were deleted."""
    deleted = 0
    for part in JOB_PARTS_IN_DELETE_ORDER:
        keys = storage.list(part) if part.endswith("/") else [part] if storage.exists(part) else []
        storage.delete_many(keys)
        deleted += len(keys)
    return deleted


def claim_job(storage: Storage, job: dict[str, Any]) -> bool:
    """Write job.json first; on an OUT that already has one, the fingerprints must agree.
    Returns True when resuming an existing job."""
    existing = read_json(storage, JOB_KEY)
    if existing is None:
        storage.put_new(JOB_KEY, json.dumps(job, indent=2, sort_keys=True).encode())
        return False
    if existing.get("fingerprint") != job["fingerprint"]:
        raise OutputMismatch(
            f"{storage.url} already holds a different job (fingerprint {existing.get('fingerprint')}, "
            f"manifest {existing.get('manifest', {}).get('source')!r}); this one has fingerprint "
            f"{job['fingerprint']}. Resume only with the same manifest and settings, choose a new --out, or "
            "pass --new-run to delete that job's output and start this one there."
        )
    return True
