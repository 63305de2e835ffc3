"""A worker's own rows: ``ManifestReader`` (the manifest kept open), ``worker.ShardFeed``
(each shard's rows read by the worker, the next one read ahead) — no Ray cluster, no model —
and ``worker.InitImageLoader`` (init images read a batch ahead, bounded; builtin:tiny in process)."""

from __future__ import annotations

import threading
import time
import weakref

import pyarrow.parquet as pq
import pytest
from conftest import write_manifest

from sdbatch.data.record import NO_CONDITIONING, ConditioningInputs
from sdbatch.manifest.reader import ManifestReader, read_rows_at
from sdbatch.manifest.sources import ManifestChanged, open_manifest
from sdbatch.run.feed import ShardFeed
from sdbatch.run.plan import make_plan
from sdbatch.spec import JobSpec


def shard(index: int, num_rows: int, rows_per_shard: int):
    """Shard ``index`` of a one-key manifest: a plain row range."""
    return make_plan(num_rows, rows_per_shard, rows_per_shard).shard(index)

ROWS = [{"id": f"f{i:02d}", "prompt": f"a red circle {i}", "seed": i, "label": i % 2} for i in range(10)]


@pytest.fixture
def manifest(tmp_path):
    return open_manifest(str(write_manifest(tmp_path / "m.parquet", ROWS)))


def test_the_feed_reads_the_same_rows_as_the_driver_did(manifest):
    spec = JobSpec()
    feed = ShardFeed(manifest, spec)
    for s in (shard(0, 10, 4), shard(2, 10, 4)):
        assert feed.take(s) == read_rows_at(manifest, spec, s.rows)
    rows = feed.take(shard(1, 10, 4), frozenset({"f05", "f07", "zz"}))
    assert [r.id for r in rows] == ["f05", "f07"]


def read_ahead(feed: ShardFeed) -> list:
    """The rows the feed has read ahead, once it has."""
    deadline = time.monotonic() + 10
    while feed.upcoming() is None:
        assert time.monotonic() < deadline, "the shard announced was not read ahead"
        time.sleep(0.01)
    return feed.upcoming()


def test_the_next_shard_is_read_ahead_and_only_one(manifest):
    feed = ShardFeed(manifest, JobSpec())
    assert feed.upcoming() is None
    feed.prefetch(shard(1, 10, 4))
    assert [r.id for r in read_ahead(feed)] == ["f04", "f05", "f06", "f07"]  # before anyone asked for it
    feed.prefetch(shard(2, 10, 4))  # one shard ahead already: not read now
    assert [r.id for r in feed.take(shard(1, 10, 4))] == ["f04", "f05", "f06", "f07"]
    assert feed.upcoming() is None  # shard 2 was not read ahead
    assert [r.id for r in feed.take(shard(2, 10, 4))] == ["f08", "f09"]
    feed.prefetch(shard(2, 10, 4))  # announced after it started: nothing to read again
    assert feed.upcoming() is None
    feed.prefetch(shard(0, 10, 4))
    read_ahead(feed)
    assert [r.id for r in feed.drop(shard(0, 10, 4))] == ["f00", "f01", "f02", "f03"]  # deferred: forgotten
    assert feed.drop(shard(0, 10, 4)) == []
    feed.prefetch(shard(1, 10, 4))
    assert feed.take(shard(1, 10, 4))[0].id == "f04"


def test_a_manifest_file_changed_during_the_job_is_refused(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", ROWS)
    manifest = open_manifest(str(path))
    write_manifest(path, ROWS + ROWS[:1])
    with pytest.raises(ManifestChanged, match=r"m.parquet: the manifest changed while the job ran"):
        ManifestReader(manifest).read_rows(JobSpec(), 0, 4)


def test_a_manifest_file_rewritten_after_it_was_opened_is_refused_at_the_next_read(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", ROWS)
    reader = ManifestReader(open_manifest(str(path)))
    assert [r.id for r in reader.read_rows(JobSpec(), 0, 2)] == ["f00", "f01"]
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_manifest(path, [{**r, "prompt": "a blue square"} for r in ROWS])  # in place: the handle sees it
    with pytest.raises(ManifestChanged, match=r"the manifest changed while the job ran"):
        reader.read_rows(JobSpec(), 2, 4)


# ---------------------------------------------------------------------------------------------
# init images: read a batch ahead, never more than resources.init_images_in_memory decoded at once


class LiveImages:
    """Test hook on ``ShardRunner._load_image``: counts the decoded init images alive (each
    one it returns, until the last reference to it goes) and the peak."""

    def __init__(self, load):
        self.load, self.live, self.peak, self.loaded = load, 0, 0, 0
        self.lock = threading.Lock()

    def __call__(self, runner, row_id, column, location):
        image, sha = self.load(runner, row_id, column, location)
        with self.lock:
            self.live += 1
            self.loaded += 1
            self.peak = max(self.peak, self.live)
        weakref.finalize(image, self._gone)
        return image, sha

    def _gone(self):
        with self.lock:
            self.live -= 1


class HeldAtGenerate:
    """The real generator, recording how many init images its runner holds at each batch."""

    def __init__(self, real):
        self.real, self.runner, self.held = real, None, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, rows, conditioning=NO_CONDITIONING):
        self.held.append(self.runner.init_images.held)
        return self.real.generate(rows, conditioning)


def test_init_images_are_read_a_batch_ahead_and_bounded(tiny_generator, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from sdbatch.manifest.reader import read_rows
    from sdbatch.run.plan import ShardSpec, canonical_batches
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    rows = []
    for i in range(5):  # 5 img2img rows, each its own colour: 3 batches of 2 (the last one short)
        Image.new("RGB", (64, 64), (20 * i, 255 - 20 * i, 90)).save(tmp_path / f"init{i}.png")
        rows.append({"id": f"i{i:02d}", "prompt": "a red square", "seed": i, "init_image": f"init{i}.png", "strength": 0.6})
    spec = load_spec(None, [], {"model.name": "builtin:tiny", "defaults.steps": 2, "resources.batch_size": 2,
                                "resources.init_images_in_memory": 4})
    manifest = open_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    live = LiveImages(ShardRunner._load_image)
    monkeypatch.setattr(ShardRunner, "_load_image", lambda runner, *image: live(runner, *image))
    generator = HeldAtGenerate(tiny_generator)
    runner = generator.runner = ShardRunner(generator, LocalStorage(tmp_path / "out"), spec, job_fingerprint="feed-test")
    shard_rows = read_rows(manifest, spec, 0, 5)
    result = runner.run_shard(ShardSpec(0, range(5)), shard_rows)

    assert (result.rows_ok, result.rows_failed) == (5, 0)
    assert live.loaded == 5 and live.peak <= 4  # 5 images, never more than the bound decoded at once
    assert generator.held == [4, 3, 1]  # each batch generates with the next one's images read (or reading)
    assert live.live == 0 and runner.init_images.held == 0
    index = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "metadata" / "00000.parquet").to_pylist()}
    for batch in canonical_batches(shard_rows, 2):  # the same pixels as the batch given its images directly
        images = [Image.open(tmp_path / f"init{int(r.id[1:])}.png").convert("RGB") for r in batch]
        expected = tiny_generator.generate(batch, ConditioningInputs(init_images=tuple(images))).pixels
        for row, pixels in zip(batch, expected):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / index[row.id]["key"])), pixels), row.id
