"""The final index merge: shard indexes of differing inferred types become one typed,
row-ordered index.parquet, written a shard at a time, on a local directory and on S3."""

from __future__ import annotations

import datetime as dt
import decimal
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_FAILED, STATUS_OK, index_schema
from sdbatch.data.record import ImageRecord, index_row
from sdbatch.manifest.reader import passthrough_types, read_rows_at
from sdbatch.manifest.sources import open_manifest
from sdbatch.output.commits import FINGERPRINT_META, commit_shard, read_commit
from sdbatch.output.index import INDEX_KEY, IndexSummary, merge_index
from sdbatch.run.plan import make_plan
from sdbatch.spec import load_spec
from sdbatch.storage.local import LocalStorage
from sdbatch.storage.s3 import S3Storage

ROWS_PER_SHARD = 4
UTC = dt.timezone.utc


def passthrough_manifest(path):
    """10 rows, three shards: rows 0–3 text-to-image with every passthrough value null,
    rows 4–7 img2img, rows 8–9 with passthrough values of many Arrow types."""
    n = 10
    late = [i >= 8 for i in range(n)]
    table = pa.table({
        "id": [f"p{i}" for i in range(n)],
        "prompt": [f"a red circle {i}" for i in range(n)],
        "init_image": [f"/data/init-{i}.png" if 4 <= i < 8 else None for i in range(n)],
        "strength": [0.5 if 4 <= i < 8 else None for i in range(n)],
        "count32": pa.array([i if k else None for i, k in zip(range(n), late)], pa.int32()),
        "taken": pa.array([dt.datetime(2026, 1, 2, i, tzinfo=UTC) if k else None for i, k in zip(range(n), late)],
                          pa.timestamp("ms", tz="UTC")),
        "tags": pa.array([[i, i + 1] if k else None for i, k in zip(range(n), late)], pa.list_(pa.int16())),
        "meta": pa.array([{"src": f"s{i}", "w": 0.5} if k else None for i, k in zip(range(n), late)],
                         pa.struct([("src", pa.string()), ("w", pa.float32())])),
        "split": pa.array(["train" if k else None for k in late], pa.string()).dictionary_encode(),
        "price": pa.array([decimal.Decimal("1.25") if k else None for k in late], pa.decimal128(6, 2)),
        "keep": pa.array([bool(i % 2) if k else None for i, k in zip(range(n), late)], pa.bool_()),
    })
    pq.write_table(table, path)
    return table


JOB_FP = "0123456789abcdef"  # the job whose commits these are


SHARDS = ["00000", "00001", "00002"]


def commit_shards(storage, manifest, spec):
    """Commit every shard as a worker would: img2img rows failed (no record), the rest ok."""
    for number in range(3):
        s = make_plan(manifest.num_rows, ROWS_PER_SHARD, ROWS_PER_SHARD).shard(number)
        rows = read_rows_at(manifest, spec, s.rows)
        records = []
        for row in rows:
            if row.is_img2img:
                records.append(index_row(row, s.name, status=STATUS_FAILED, error="init_image unreadable"))
                continue
            record = ImageRecord(
                row=row, shard=s.name, batch_id=f"{s.name}-000", batch_rows=tuple(r.id for r in rows if not r.is_img2img),
                loras=(), prompt_truncated_at=None, init_image_sha256=None, model_fingerprint="f" * 64, device="cpu",
                dtype="float32", versions={"torch": "2.13.0"}, torch_threads=2, model_name="builtin:tiny",
                model_family="StableDiffusionPipeline", scheduler_config={})
            records.append(record.to_index_row(status=STATUS_OK, key=f"images/{s.name}/{row.id}.png",
                                               sha256="0" * 64, bytes=100 + row.index, attempt=1, worker="w"))
        schema = index_schema(passthrough_types(manifest))
        commit_shard(storage, s.name, list(reversed(records)), schema, JOB_FP)  # merge restores row order


@pytest.fixture
def committed(tmp_path):
    source = passthrough_manifest(tmp_path / "manifest.parquet")
    manifest = open_manifest(str(tmp_path / "manifest.parquet"))
    spec = load_spec(None, [], {"resources.rows_per_shard": ROWS_PER_SHARD})
    return source, manifest, spec


def check_index(index: pa.Table, source: pa.Table, manifest) -> None:
    assert index.schema == index_schema(passthrough_types(manifest))
    assert index.column("id").to_pylist() == source.column("id").to_pylist()
    assert index.column("row").to_pylist() == list(range(10))
    for name in manifest.passthrough_columns:  # values and types exactly as in the manifest
        assert index.column(name).to_pylist() == source.column(name).to_pylist(), name
        assert index.schema.field(name).type == source.schema.field(name).type, name
    assert index.column("status").to_pylist() == [STATUS_OK] * 4 + [STATUS_FAILED] * 4 + [STATUS_OK] * 2
    assert index.column("strength").to_pylist() == [None] * 4 + [0.5] * 4 + [None] * 2
    assert index.column("batch_rows").to_pylist()[9] == ["p8", "p9"]
    assert index.column("batch_rows").to_pylist()[5] is None


@pytest.mark.parametrize("row_group_rows", [1, 65_536])
def test_merge_types_every_column_and_keeps_row_order(tmp_path, committed, monkeypatch, row_group_rows):
    source, manifest, spec = committed
    storage = LocalStorage(tmp_path / "out")
    commit_shards(storage, manifest, spec)
    monkeypatch.setattr("sdbatch.output.index.MERGE_ROW_GROUP_ROWS", row_group_rows)
    summary = merge_index(storage, SHARDS, manifest.num_rows, passthrough_types(manifest), JOB_FP)
    assert (summary.rows, summary.rows_failed) == (10, 4)
    index_file = pq.ParquetFile(tmp_path / "out" / INDEX_KEY)
    # shard indexes are gathered into row groups of MERGE_ROW_GROUP_ROWS: with 1, one per shard
    assert index_file.metadata.num_row_groups == (3 if row_group_rows == 1 else 1)
    check_index(index_file.read(), source, manifest)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp file left


def test_every_commit_has_the_declared_schema_and_a_retry_replaces_only_the_commit_it_read(tmp_path, committed):
    source, manifest, spec = committed
    storage = LocalStorage(tmp_path / "out")
    commit_shards(storage, manifest, spec)
    schema = index_schema(passthrough_types(manifest))
    for name in ("00000", "00001", "00002"):  # strength is null throughout 00000 and 00002, still float64
        stored = pq.read_schema(tmp_path / "out" / "metadata" / f"{name}.parquet")
        assert stored.remove_metadata() == schema and stored.metadata[FINGERPRINT_META] == JOB_FP.encode()
    read = read_commit(storage, "00001", JOB_FP)
    fixed = [{**r, "status": STATUS_OK, "error": None} for r in read.records]
    assert commit_shard(storage, "00001", fixed, schema, JOB_FP, replacing=read)
    assert {r["status"] for r in read_commit(storage, "00001", JOB_FP).records} == {STATUS_OK}
    assert not commit_shard(storage, "00001", read.records, schema, JOB_FP, replacing=read)  # it changed since it was read
    assert {r["status"] for r in read_commit(storage, "00001", JOB_FP).records} == {STATUS_OK}
    assert not commit_shard(storage, "00001", read.records, schema, JOB_FP)  # a new shard's commit is create-once
    with pytest.raises(ValueError, match="does not declare: quality"):
        commit_shard(storage, "00003", [{**fixed[0], "quality": 1.0}], schema, JOB_FP)
    assert not (tmp_path / "out" / "metadata" / "00003.parquet").exists()


def test_merge_uploads_the_index_to_s3(s3_bucket, committed):
    source, manifest, spec = committed
    endpoint, bucket = s3_bucket
    storage = S3Storage(f"s3://{bucket}/job", endpoint_url=endpoint)
    commit_shards(storage, manifest, spec)
    summary = merge_index(storage, SHARDS, manifest.num_rows, passthrough_types(manifest), JOB_FP)
    assert (summary.rows, summary.rows_failed) == (10, 4)
    check_index(pq.read_table(io.BytesIO(storage.get(INDEX_KEY))), source, manifest)


def test_index_column_types_cover_every_index_column():
    from sdbatch.data.columns import KNOWN_COLUMNS
    from sdbatch.data.index import INDEX_RESULT_COLUMNS

    assert set(INDEX_COLUMN_TYPES) == {"row", *KNOWN_COLUMNS, *INDEX_RESULT_COLUMNS}


def test_merge_of_no_committed_shard_writes_an_empty_typed_index(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    assert merge_index(storage, [], 0, {"label": pa.int32()}, JOB_FP) == IndexSummary(rows=0, rows_failed=0, first_failed=[])
    index = pq.read_table(tmp_path / "out" / INDEX_KEY)
    assert index.num_rows == 0 and index.schema == index_schema({"label": pa.int32()})
