"""``run.progress``: the driver's live view and its snapshot (counts, rate, ETA, plurals). Pure: a
local OUT, no Ray."""

import time

import pytest

from sdbatch.output.documents import Progress
from sdbatch.run.progress import ProgressFeed, devices_text, plural
from sdbatch.storage.local import LocalStorage


def feed_at(tmp_path, *, interactive: bool, seconds_running: float) -> ProgressFeed:
    feed = ProgressFeed(LocalStorage(tmp_path / "out"), total_rows=96, rows_already_done=0, shards_total=6,
                        shards_committed=0, interactive=interactive)
    feed._t0 = time.monotonic() - seconds_running  # the run began this long ago
    return feed


def test_rows_in_uncommitted_shards_are_in_flight_not_done(tmp_path):
    feed = feed_at(tmp_path, interactive=False, seconds_running=10)
    feed.update(16, 0, shards_committed=0, shards_failed=0, workers=1, in_flight=16)
    feed.close("interrupted")
    written = Progress.read(feed.storage)
    assert (written.state, written.rows_done, written.rows_in_flight, written.rows_remaining) == ("interrupted", 0, 16, 80)


def test_the_bar_shows_the_eta_of_its_own_rate(tmp_path, capsys):
    # 16/96 rows in 32.65 s: 0.49 img/s, so the 80 rows left take 163 s
    feed = feed_at(tmp_path, interactive=True, seconds_running=32.65)
    feed.update(16, 0, shards_committed=0, shards_failed=0, workers=1)
    feed.close("interrupted")
    bar = capsys.readouterr().err
    assert "0.49 img/s" in bar and "ETA 2m 43s" in bar, bar


def test_plurals():
    assert [plural(1, "shard"), plural(2, "shard"), plural(1, "batch", "batches"), plural(0, "batch", "batches")] == [
        "1 shard", "2 shards", "1 batch", "0 batches"]


@pytest.mark.parametrize(("workers", "gpus", "text"), [
    (1, 0, "1 worker"), (3, 0, "3 workers"), (1, 1, "1 worker × 1 GPU"), (2, 2, "2 workers × 2 GPUs"),
    (4, 0.5, "4 workers × 0.5 GPU"),
])
def test_devices_are_counted_in_words(workers, gpus, text):
    assert devices_text(workers, gpus) == text
