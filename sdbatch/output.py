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
import tarfile
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import sdbatch
from sdbatch.manifest import Manifest
from sdbatch.spec import JobSpec, fingerprint
from sdbatch.storage import NotFound, Storage

JOB_KEY = "_sdbatch/job.json"
LOCK_KEY = "_sdbatch/lock.json"
PROGRESS_KEY = "_sdbatch/progress.json"
METADATA_PREFIX = "metadata/"
INDEX_KEY = "index.parquet"
SUCCESS_KEY = "_SUCCESS"

STATUS_OK = "ok"
STATUS_FAILED = "failed"


class OutputMismatch(ValueError):
    """OUT already holds a different job."""


def image_key(shard_name: str, row_id: str, ext: str) -> str:
    return f"images/{shard_name}/{row_id}.{ext}"


def tar_key(shard_name: str) -> str:
    return f"shards/{shard_name}.tar"


def metadata_key(shard_name: str) -> str:
    return f"{METADATA_PREFIX}{shard_name}.parquet"


def webdataset_key(row_id: str) -> str:
    """webdataset splits a member name at its first dot, so dots in ids are escaped."""
    return row_id.replace(".", "%2E")


def committed_shards(storage: Storage) -> set[str]:
    """Names of committed shards, from a listing of metadata/ only."""
    return {
        key[len(METADATA_PREFIX) : -len(".parquet")]
        for key in storage.list(METADATA_PREFIX)
        if key.endswith(".parquet")
    }


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


def records_to_parquet(records: list[dict[str, Any]]) -> bytes:
    """A shard index's bytes (records share one set of keys: ``worker.index_row``)."""
    return table_to_parquet(pa.Table.from_pylist(records))


def commit_shard(storage: Storage, shard_name: str, records: list[dict[str, Any]]) -> bool:
    """Write the shard index (create-once). Returns False if an earlier attempt had already
    committed this shard — its index stays, ours is dropped."""
    return storage.put_new(metadata_key(shard_name), records_to_parquet(records)).created


def read_shard_index(storage: Storage, shard_name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.get(metadata_key(shard_name))))


def _committed_index(storage: Storage) -> pa.Table:
    """Every committed shard index, concatenated in row order."""
    names = sorted(committed_shards(storage), key=int)
    tables = [read_shard_index(storage, name) for name in names]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return table.sort_by("row") if "row" in table.column_names else table


def merge_index(storage: Storage) -> pa.Table:
    """Write every committed shard index, in row order, as ``index.parquet``.
    Idempotent: an interrupted merge is simply redone."""
    table = _committed_index(storage)
    storage.put(INDEX_KEY, table_to_parquet(table))
    return table


def read_index(storage: Storage) -> pa.Table:
    """The final index if written, else the merge of what is committed so far (not written)."""
    try:
        return pq.read_table(io.BytesIO(storage.get(INDEX_KEY)))
    except NotFound:
        return _committed_index(storage)


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(key))
    except NotFound:
        return None


def write_json(storage: Storage, key: str, data: dict[str, Any]) -> None:
    storage.put(key, json.dumps(data, indent=2, sort_keys=True).encode())


def job_record(spec: JobSpec, manifest: Manifest, model_fingerprint: str | None) -> dict[str, Any]:
    """``_sdbatch/job.json``. Its fingerprint covers everything that decides the images and
    where rows land — spec settings, manifest content, model weights — so a resume with any
    of them changed is refused rather than mixing two jobs in one OUT."""
    return {
        "fingerprint": fingerprint({
            "spec": spec.fingerprint_fields(), "manifest": manifest.fingerprint,
            "rows": manifest.num_rows, "model": model_fingerprint,
        }),
        "spec": spec.model_dump(mode="json"),
        "manifest": {"source": manifest.source, "fingerprint": manifest.fingerprint,
                     "num_rows": manifest.num_rows, "files": list(manifest.files)},
        "model": {"name": spec.model.name, "fingerprint": model_fingerprint},
        "sdbatch_version": sdbatch.__version__,
        "created_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


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
            f"{job['fingerprint']}. Resume only with the same manifest and settings, or choose a new --out."
        )
    return True
