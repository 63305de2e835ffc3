"""A finished job output of any number of rows, built directly as files — no Ray, no model run —
for tests that measure how a reader's memory grows with the index (issue 23).

``build_output(root, rows)`` writes, under ``root``: ``manifest.parquet`` (id, prompt, seed, a
passthrough ``label``), and the job's OUT ``root/out``: ``_sdbatch/job.json`` (a real job
record of a ``builtin:null`` job over that manifest, 64², batches of 8), one commit per shard
(``metadata/NNNNN.parquet``, the index schema, stamped), ``index.parquet`` (merged by the real
``merge_index``) and ``_SUCCESS``. Each ok row's object (``objects=True``) is one small real
PNG, the same bytes for every row, at the row's key in the layout ``fmt`` names (an image per
row, or a tar per shard), so readers that decode or hash images find what the index records.
Every ``failed_every``-th row (0: none) failed, with an error naming it and no object. The
ok rows' images being one image, the merge marks all but the first as its duplicates.
The images are not what the model would draw: ``reproduce`` of such a row regenerates its
batch and reports drift, never a match.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from sdbatch.data.index import STATUS_FAILED, STATUS_OK, index_schema
from sdbatch.manifest.sources import open_manifest
from sdbatch.models.builtin import resolve_builtin
from sdbatch.models.pins import fingerprint_model_dir
from sdbatch.output.claim import job_record
from sdbatch.output.commits import FINGERPRINT_META, metadata_key, shard_name, table_to_parquet
from sdbatch.output.documents import FailedRow, Success
from sdbatch.output.index import merge_index
from sdbatch.output.layout import IMAGES_PREFIX, image_key, layout_for, sha256, tar_key, webdataset_key
from sdbatch.run.plan import batch_id
from sdbatch.spec import JobSpec
from sdbatch.storage.local import LocalStorage

SIZE = 64
BATCH_SIZE = 8
VERSIONS = json.dumps({"diffusers": "0.0", "python": "3", "sdbatch": "0", "torch": "0"}, sort_keys=True)


def row_id(row: int) -> str:
    """Ids sort as their rows do, as a manifest's usually do (row-group id statistics prune)."""
    return f"img-{row:09d}"


def _png() -> bytes:
    """A few hundred bytes: readers that hash every object stay quick."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(SIZE, dtype=np.uint8)[:, None] * 4  # a red ramp, so a thumbnail shows something
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _manifest(path: Path, rows: int) -> None:
    numbers = np.arange(rows)
    pq.write_table(pa.table({
        "id": pa.array([row_id(i) for i in range(rows)], pa.string()),
        "prompt": pa.array([f"a photo of thing {i % 97}, detailed, variation {i}" for i in range(rows)], pa.string()),
        "seed": pa.array(numbers, pa.int64()),
        "label": pa.array(numbers % 10, pa.int64()),
    }), path)


def _failed(row: int, failed_every: int) -> bool:
    return bool(failed_every) and row % failed_every == failed_every - 1


def _key(fmt: str, shard: str, rid: str) -> str:
    """The index key the layout gives ``rid``'s image (``layout.ShardWriter.finish``)."""
    return image_key(shard, rid, "png") if fmt == "files" else f"{tar_key(shard)}#{webdataset_key(rid)}.png"


def _commit(start: int, stop: int, name: str, keys: list[str | None], image: bytes, model_pin: str,
            failed_every: int) -> pa.Table:
    """Shard ``name``'s index rows ``start`` … ``stop`` - 1 (columns the index has, else nulls)."""
    n, digest = stop - start, sha256(image)
    rows = range(start, stop)
    ids = [row_id(i) for i in rows]
    failed = np.array([_failed(i, failed_every) for i in rows], dtype=bool)
    batch_of = [(i - start) // BATCH_SIZE for i in rows]
    values: dict[str, pa.Array] = {
        "id": pa.array(ids, pa.string()), "row": pa.array(rows, pa.int64()),
        "prompt": pa.array([f"a photo of thing {i % 97}, detailed, variation {i}" for i in rows], pa.string()),
        "seed": pa.array(rows, pa.int64()),
        "steps": pa.array(np.full(n, 2), pa.int64()),
        "width": pa.array(np.full(n, SIZE), pa.int64()), "height": pa.array(np.full(n, SIZE), pa.int64()),
        "shard": pa.array([name] * n, pa.string()),
        "batch_id": pa.array([batch_id(name, int(b)) for b in batch_of], pa.string()),
        "batch_rows": pa.array([ids[b * BATCH_SIZE:(b + 1) * BATCH_SIZE] for b in batch_of], pa.list_(pa.string())),
        "model_fingerprint": pa.array([model_pin] * n, pa.string()),
        "device": pa.array(["cpu"] * n, pa.string()), "dtype": pa.array(["float32"] * n, pa.string()),
        "torch_threads": pa.array(np.ones(n, dtype=np.int64), pa.int64()),
        "versions": pa.array([VERSIONS] * n, pa.string()),
        "status": pa.array(np.where(failed, STATUS_FAILED, STATUS_OK), pa.string()),
        "error": pa.array([f"synthetic failure of row {i}" if bad else None for i, bad in zip(rows, failed)], pa.string()),
        "key": pa.array(keys, pa.string()),
        "sha256": pa.array([None if bad else digest for bad in failed], pa.string()),
        "bytes": pa.array([None if bad else len(image) for bad in failed], pa.int64()),
        "attempt": pa.array(np.ones(n, dtype=np.int64), pa.int64()),
        "worker": pa.array([f"node-{i % 3}:4123{i % 2}" for i in rows], pa.string()),
        "generate_seconds": pa.array(np.full(n, 0.25)),
        "phash": pa.array([f"{(i * 2654435761) % 2**64:016x}" for i in rows], pa.string()),
        "luma_mean": pa.array(np.full(n, 120.5)), "luma_std": pa.array(np.full(n, 40.25)),
        "blank": pa.array(np.zeros(n, dtype=bool)),
        "label": pa.array([i % 10 for i in rows], pa.int64()),
    }
    schema = index_schema({"label": pa.int64()}).with_metadata(None)
    columns = [values[f.name] if f.name in values else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def build_output(root: Path, rows: int, *, fmt: str = "files", objects: bool = True, rows_per_shard: int = 1000,
                 failed_every: int = 0) -> Path:
    """A finished ``builtin:null`` job of ``rows`` rows at ``root/out`` (returned); its manifest
    at ``root/manifest.parquet``."""
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.parquet"
    _manifest(manifest_path, rows)
    out = root / "out"
    spec = JobSpec.model_validate({
        "model": {"name": "builtin:null"}, "output": {"format": fmt},
        "defaults": {"width": SIZE, "height": SIZE, "steps": 2},
        "resources": {"batch_size": BATCH_SIZE, "rows_per_shard": rows_per_shard},
    })
    model_pin = fingerprint_model_dir(resolve_builtin("builtin:null"))
    job = job_record(spec, open_manifest(str(manifest_path)), model_pin)
    storage = LocalStorage(str(out))
    job.write(storage)
    layout, image = layout_for(storage, spec.output), _png()
    names = []
    for number, start in enumerate(range(0, rows, rows_per_shard)):
        name, stop = shard_name(number), min(start + rows_per_shard, rows)
        names.append(name)
        ids = [row_id(i) for i in range(start, stop)]
        failed = {row_id(i) for i in range(start, stop) if _failed(i, failed_every)}
        keys = [None if rid in failed else _key(fmt, name, rid) for rid in ids]
        if objects and fmt == "files":  # written directly: a create-once put per row is slow
            (out / IMAGES_PREFIX / name).mkdir(parents=True)
            for key in filter(None, keys):
                (out / key).write_bytes(image)
        elif objects:
            writer, ok = layout.writer(name), [rid for rid in ids if rid not in failed]
            for rid in ok:
                writer.add(rid, image, sha256(image), {"id": rid})
            assert [p.key for p in writer.finish(ok).values()] == [k for k in keys if k is not None]
        table = _commit(start, stop, name, keys, image, model_pin, failed_every)
        storage.put(metadata_key(name), table_to_parquet(
            table.replace_schema_metadata({FINGERPRINT_META: job.fingerprint.encode()})))
    summary = merge_index(storage, names, rows, {"label": pa.int64()}, job.fingerprint)
    index = pq.read_table(out / "index.parquet", columns=["status"])
    rows_ok = pc.sum(pc.equal(index.column("status"), STATUS_OK)).as_py() or 0
    Success(fingerprint=job.fingerprint, rows_total=rows, rows_in_index=summary.rows, rows_ok=rows_ok,
            rows_failed=summary.rows_failed, rows_duplicate=summary.duplicates,
            failed_rows=[FailedRow(id=r.id, error=r.error) for r in summary.first_failed]).write(storage)
    return out


#: every pool ``arrow_pool`` made, kept for the life of the process: Arrow's buffers keep a raw
#: pointer to the pool they came from, and one freed by a reader thread after its pool object had
#: gone would be a use-after-free (a segfault of the test process)
_MEASURING_POOLS: list[pa.MemoryPool] = []


@contextmanager
def arrow_pool() -> Iterator[pa.MemoryPool]:
    """Arrow's default memory pool behind a proxy of its own while the block runs: the proxy's
    ``max_memory()`` is the block's Arrow peak."""
    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    _MEASURING_POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(previous)
