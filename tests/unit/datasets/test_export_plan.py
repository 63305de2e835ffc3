"""The pure parts of an export's plan: ``--split`` parsed and checked, each split's rows cut into
output shards of about ``--shard-size`` bytes, and a row's split a stable function of its id."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sdbatch.datasets.export import ExportError, ExportOptions, Selection, _SplitCutter, parse_splits


def test_splits_parse_and_bad_ones_are_refused():
    assert parse_splits("train=0.9, test=0.1") == (("train", 0.9), ("test", 0.1))
    assert parse_splits(None) == ()
    for text, said in (("train=0.9,test=0.2", "sum to 1.1, not 1"), ("train=0.5,train=0.5", "'train=0.5' is not"),
                       ("train", "'train' is not NAME=FRACTION"), ("a/b=1", "'a/b=1' is not"),
                       ("train=x,test=1", "'train=x' is not")):
        with pytest.raises(ExportError, match=said):
            parse_splits(text)


def test_shards_hold_about_shard_size_bytes_in_row_order_across_batches():
    cutter = _SplitCutter(shard_bytes=1000)
    sizes = np.full(50, 90)
    sizes[20] = 2500  # one row larger than a shard: a shard of its own
    rows = np.arange(0, 100, 2)  # the selected rows of two batches
    cutter.add(rows[:30], sizes[:30])
    cutter.add(rows[30:], sizes[30:])
    shards = cutter.shards("train")
    assert [s.number for s in shards] == list(range(len(shards))) and {s.of for s in shards} == {len(shards)}
    assert sum(s.rows for s in shards) == 50 and sum(s.bytes for s in shards) == int(sizes.sum())
    assert all(s.bytes < 1000 + 2500 for s in shards)  # a shard goes over by less than its last row
    assert all(a.last_row < b.first_row for a, b in zip(shards, shards[1:]))  # contiguous, disjoint ranges
    assert shards[0].first_row == 0 and shards[-1].last_row == 98


def test_a_rows_split_depends_on_its_id_alone():
    selection = Selection(ExportOptions(to="hf", splits=(("train", 0.8), ("test", 0.2))))
    ids = [f"img-{i:05d}" for i in range(2000)]
    first = selection.splits_of(pa.array(ids))
    assert (selection.splits_of(pa.array(ids[::-1]))[::-1] == first).all()  # not by position
    assert 0.75 < (first == 0).mean() < 0.85


def test_the_columns_read_are_the_ones_given_and_every_one_where_names():
    names = ["id", "row", "status", "bytes", "label", "label_2", "Blank", "prompt", "clip score"]
    also = ["row", "id", "status", "bytes"]

    def read(where: str | None) -> list[str] | None:
        return Selection(ExportOptions(to="hf", where=where)).columns_read(names, also)

    assert read(None) == also
    assert read("label = 0 AND row % 10 = 0") == [*also, "label"]  # not label_2: a word, not a prefix
    assert read('NOT blank AND "clip score" > 0.3') == [*also, "Blank", "clip score"]  # names match without case
    assert read("prompt LIKE '%cat%'") == [*also, "prompt"]  # a superset: a name inside a string still counts
    assert read("row * 2 > 10") is None and read("COLUMNS('label.*') = 1") is None  # patterns: every column


def test_a_bad_where_names_every_index_column_though_fewer_were_read():
    selection = Selection(ExportOptions(to="hf", where="lable = 0"), ["id", "row", "status", "label"])
    batch = pa.record_batch({"row": [0], "status": ["ok"]})
    with pytest.raises(ExportError, match=r"over the index columns \(id, row, status, label\)"):
        selection.select(batch)


def test_an_hf_shard_gathers_its_slices_into_row_groups(tmp_path, monkeypatch):
    import base64

    import pyarrow.parquet as pq

    from sdbatch.datasets.export import ExportPlan, _ParquetShard

    monkeypatch.setattr("sdbatch.datasets.export.ROW_GROUP_ROWS", 100)
    schema = pa.schema([("id", pa.string()), ("row", pa.int64())])
    plan = ExportPlan(fingerprint="f", index_source="index.parquet", index_rows=192, options=ExportOptions(to="hf"),
                      columns=("id", "row"), schema_b64=base64.b64encode(schema.serialize().to_pybytes()).decode(), shards=())
    shard = _ParquetShard(plan, tmp_path / "shard.parquet")
    for start in range(0, 192, 64):  # three 64-row slices: a group once 100 rows are gathered, the rest at close
        rows = pa.record_batch({"id": [f"img-{i}" for i in range(start, start + 64)], "row": list(range(start, start + 64))})
        shard.add(rows, [b"x" * 10] * 64, ["png"] * 64)
    shard.close()
    written = pq.ParquetFile(tmp_path / "shard.parquet")
    assert [written.metadata.row_group(g).num_rows for g in range(written.num_row_groups)] == [128, 64]
    assert written.read(columns=["row"]).column("row").to_pylist() == list(range(192))
