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


def test_a_log_line_prints_above_the_bar_not_into_it(tmp_path):
    """Issue 27: a handler writes to the stream it holds, so without routing a log line lands
    right after the bar's text (``ETA -:--:--2026-12-06 … loading the model``)."""
    import io
    import logging

    from rich.console import Console

    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        feed = ProgressFeed(LocalStorage(tmp_path / "out"), total_rows=96, rows_already_done=0, shards_total=6,
                            shards_committed=0, interactive=True,
                            console=Console(file=terminal, force_terminal=True, width=100))
        feed.update(16, 0, shards_committed=0, shards_failed=0, workers=1)
        logging.getLogger("sdbatch.cli").warning("loading the model")
        feed.close("interrupted")
        assert handler in root.handlers  # given back when the bar ends
        logging.getLogger("sdbatch.cli").warning("after the bar")
    finally:
        root.removeHandler(handler)
    text = terminal.getvalue()
    assert "\r\x1b[2KWARNING sdbatch.cli: loading the model\n" in text, repr(text)  # the bar's line erased first
    assert text.count("loading the model") == 1 and text.endswith("WARNING sdbatch.cli: after the bar\n")


def test_failed_rows_warning_has_no_1_rows(caplog):
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.policy import Schedule, Work
    from sdbatch.run.protocol import ShardResult

    schedule = Schedule([Work(ShardSpec(0, range(4))), Work(ShardSpec(1, range(4, 8)))], max_attempts=3)
    schedule.completed(schedule.next(0.0), ShardResult("00000", rows_ok=3, rows_failed=1))
    schedule.completed(schedule.next(0.0), ShardResult("00001", rows_ok=2, rows_failed=2))
    assert [r.getMessage() for r in caplog.records] == [
        "shard 00000: rows failed permanently: 1", "shard 00001: rows failed permanently: 2"]


def test_the_images_per_second_chart_is_a_moving_average():
    """Issue 27: batches land whole (16 rows, then nothing for a sample), so per-sample rates
    are a barcode; averaged over the window, the rate is the steady one."""
    from sdbatch.audit.report import moving_rate, throughput_chart

    history = [(3.0 * i, 16 * (i // 2), 0) for i in range(200)]  # 16 rows every 6 s: 2.67 img/s
    per_sample = moving_rate(history, 0)
    assert set(per_sample) == {0.0, 16 / 3}
    smoothed = moving_rate(history, 60)
    assert all(abs(rate - 16 / 6) < 0.15 for rate in smoothed[20:]), smoothed[20:]
    assert throughput_chart(history).startswith("data:image/png;base64,")
