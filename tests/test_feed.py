"""A worker's own rows: ``ManifestReader`` (the manifest kept open) and ``worker.ShardFeed``
(each shard's rows read by the worker, the next one read ahead) — no Ray cluster, no model."""

from __future__ import annotations

import threading

import pytest
from conftest import write_manifest

from sdbatch.manifest import ManifestError, ManifestReader, open_manifest, read_rows_at
from sdbatch.plan import make_plan
from sdbatch.spec import JobSpec
from sdbatch.worker import ShardFeed


def shard(index: int, num_rows: int, rows_per_shard: int):
    """Shard ``index`` of a one-key manifest: a plain row range."""
    return make_plan(num_rows, rows_per_shard, rows_per_shard).shard(index)

ROWS = [{"id": f"f{i:02d}", "prompt": f"a red circle {i}", "seed": i, "label": i % 2} for i in range(10)]


class InitImages:
    """Stands in for ShardRunner.load_init_images: records which rows it was asked for."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.called = threading.Event()

    def __call__(self, rows):
        self.calls.append([r.id for r in rows])
        self.called.set()
        return {}


@pytest.fixture
def manifest(tmp_path):
    return open_manifest(str(write_manifest(tmp_path / "m.parquet", ROWS)))


def test_the_feed_reads_the_same_rows_as_the_driver_did(manifest):
    spec = JobSpec()
    feed = ShardFeed(manifest, spec, InitImages())
    for s in (shard(0, 10, 4), shard(2, 10, 4)):
        rows, init_images = feed.take(s)
        assert rows == read_rows_at(manifest, spec, s.rows) and init_images == {}
    rows, _ = feed.take(shard(1, 10, 4), frozenset({"f05", "f07", "zz"}))
    assert [r.id for r in rows] == ["f05", "f07"]


def test_the_next_shard_is_read_ahead_and_only_one(manifest):
    loads = InitImages()
    feed = ShardFeed(manifest, JobSpec(), loads)
    feed.prefetch(shard(1, 10, 4))
    assert loads.called.wait(10)  # read (and its init images started) before anyone asked for it
    feed.prefetch(shard(2, 10, 4))  # one shard ahead already: not read now
    rows, _ = feed.take(shard(1, 10, 4))
    assert [r.id for r in rows] == ["f04", "f05", "f06", "f07"]
    assert loads.calls == [["f04", "f05", "f06", "f07"]]
    rows, _ = feed.take(shard(2, 10, 4))
    assert [r.id for r in rows] == ["f08", "f09"] and len(loads.calls) == 2
    feed.prefetch(shard(2, 10, 4))  # announced after it started: nothing to read again
    feed.prefetch(shard(0, 10, 4))
    feed.drop(shard(0, 10, 4))  # deferred: its read-ahead is forgotten, the next can be read
    feed.prefetch(shard(1, 10, 4))
    assert feed.take(shard(1, 10, 4))[0][0].id == "f04"


def test_a_manifest_file_changed_during_the_job_is_refused(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", ROWS)
    manifest = open_manifest(str(path))
    write_manifest(path, ROWS + ROWS[:1])
    with pytest.raises(ManifestError, match=r"holds 11 rows, but the job was planned with 10.*changed"):
        ManifestReader(manifest).read_rows(JobSpec(), 0, 4)
