"""The bounded-memory pieces of `verify` (issue 23): the seeded row sample, the set of shard
names, the capped finding list, and which shard a layout's key belongs to."""

from __future__ import annotations

import pyarrow as pa

from sdbatch.audit import object_check
from sdbatch.audit.index_check import RowSample
from sdbatch.audit.object_check import Findings, ShardSet
from sdbatch.output.layout import FilesLayout, WebdatasetLayout


def index_batches(rows: int, per_batch: int) -> list[pa.RecordBatch]:
    status = ["failed" if r % 10 == 3 else "ok" for r in range(rows)]
    table = pa.table({"id": [f"r{r}" for r in range(rows)], "row": pa.array(range(rows), pa.int64()),
                      "shard": [f"{r // 100:05d}" for r in range(rows)], "status": status})
    return table.to_batches(per_batch)


def drawn(size: int, seed: int, per_batch: int, stream: int = 0) -> RowSample:
    rows = RowSample(size, seed, stream)
    for batch in index_batches(5_000, per_batch):
        rows.add(batch)
    return rows


def sample(size: int, seed: int, per_batch: int, stream: int = 0) -> list[str]:
    return drawn(size, seed, per_batch, stream).ids


def test_a_sample_depends_on_its_seed_not_on_how_the_index_is_batched():
    first = sample(20, 7, 1_000)
    assert len(first) == 20 and len(set(first)) == 20
    assert first == sample(20, 7, 333) == sample(20, 7, 5_000)
    assert all(int(i[1:]) % 10 != 3 for i in first)  # ok rows only
    assert first == sorted(first, key=lambda i: int(i[1:]))  # in row order
    assert first != sample(20, 8, 1_000) and first != sample(20, 7, 1_000, stream=1)
    assert len(sample(10_000, 7, 1_000)) == 4_500  # every ok row, when fewer than asked
    rows = drawn(20, 7, 333)
    assert rows.rows == [int(i[1:]) for i in first]
    assert rows.shards == {f"{int(i[1:]) // 100:05d}" for i in first}  # the shards whose commits --sample reads


def test_shard_set_knows_shard_names_and_nothing_like_them():
    shards = ShardSet()
    shards.add(["00000", "00002", "123456", "odd"])
    assert all(n in shards for n in ["00000", "00002", "123456", "odd"])
    assert not any(n in shards for n in ["00001", "2", "0002", "123457", "000002", "other"])


def test_findings_keep_the_first_ones_and_count_the_rest(monkeypatch):
    monkeypatch.setattr(object_check, "KEPT", 3)
    found = Findings(range(5))
    found.append(9)
    assert list(found) == [0, 1, 2] and found.total == 6


def test_which_shard_a_key_belongs_to():
    files, tars = FilesLayout(None), WebdatasetLayout(None)  # type: ignore[arg-type]  # no storage needed
    assert files.owner("images/00003/x.png") == files.owner("images/00003/") == "00003"
    assert files.owner("images/stray.png") is None and files.owner("shards/00003.tar") is None
    assert tars.owner("shards/00003.tar") == tars.owner("shards/00003-retry-0a1b2c3d.tar") == "00003"
    assert tars.owner("shards/00003.tar.bak") is None and tars.owner("shards/x/00003.tar") is None
    assert files.shard_prefix("00003") == "images/00003/" and tars.shard_prefix("00003") == "shards/00003"
