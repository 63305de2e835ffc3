"""``output.state``: a job's state derived once from OUT (phase, rows, last run), as ``status``,
the report and the dry run read it. Pure: a local OUT written by hand, no Ray."""

import pytest
from conftest import write_manifest

from sdbatch.manifest.sources import open_manifest
from sdbatch.output.claim import job_record
from sdbatch.output.documents import CorruptState, Progress, Success
from sdbatch.output.state import INTERRUPTED_TEXT, read_state
from sdbatch.spec import load_spec
from sdbatch.storage.local import LocalStorage


@pytest.fixture
def out(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": "a red square"} for i in range(3)])
    storage = LocalStorage(tmp_path / "out")
    job_record(load_spec(None, [], {}), open_manifest(str(manifest)), "pin").write(storage)
    return storage


def test_no_job_record_is_no_state(tmp_path):
    assert read_state(LocalStorage(tmp_path / "empty")) is None


def test_a_claimed_job_has_not_started(out):
    state = read_state(out)
    assert (state.phase, state.phase_text, state.shards_committed, state.shards_total) == ("not started", "not started", 0, None)
    assert state.rows == {"rows_done": 0, "rows_failed": 0, "rows_remaining": 3}
    assert state.last_run == (None, 0, None)


def test_running_without_a_live_driver_is_interrupted(out):
    Progress(rows_total=3, rows_done=1, rows_remaining=2, rows_generated_this_run=1, images_per_second=0.5,
             shards_total=2, started_at="2026-01-01T00:00:00+00:00", updated_at="2026-01-01T00:00:04+00:00").write(out)
    out.put("metadata/00000.parquet", b"a commit")
    state = read_state(out)
    assert (state.phase, state.phase_text, state.driver_alive) == ("interrupted", INTERRUPTED_TEXT, False)
    assert state.shards_committed == 1 and state.shards_total == 2
    assert state.rows == {"rows_done": 1, "rows_failed": 0, "rows_remaining": 2}
    assert state.last_run == (4.0, 1, 0.5)
    assert read_state(out, num_shards=0).shards_committed == 0  # a name the plan does not make is no commit


def test_a_failed_run_keeps_its_own_word(out):
    Progress(state="failed", rows_total=3).write(out)
    assert (read_state(out).phase, read_state(out).phase_text) == ("failed", "failed")


def test_success_finishes_the_job_and_its_numbers_win(out):
    Progress(rows_total=3, rows_done=1).write(out)
    Success(fingerprint="f", rows_total=3, rows_in_index=3, rows_ok=2, rows_failed=1, rows_generated_this_run=3,
            wall_seconds_this_run=6.0, images_per_second_this_run=0.5).write(out)
    state = read_state(out)
    assert state.phase == "finished"
    assert state.rows == {"rows_done": 2, "rows_failed": 1, "rows_remaining": 0}
    assert state.last_run == (6.0, 3, 0.5)


def test_a_corrupt_snapshot_stops_readers_unless_tolerated(out):
    out.put(Success.KEY, b'{"fingerprint": ')
    with pytest.raises(CorruptState, match="_SUCCESS"):
        read_state(out)
    state = read_state(out, tolerate_corrupt=True)
    assert state.success is None and state.phase == "unknown"
    assert len(state.unreadable) == 1 and "_SUCCESS" in state.unreadable[0]


def test_rows_of_uncommitted_shards_are_not_done_and_a_stopped_run_says_they_are_lost(out):
    # Ctrl-C at 16/96 rows generated, no shard committed: none of them is durable
    Progress(state="interrupted", rows_total=96, rows_done=0, rows_in_flight=16, rows_remaining=80,
             shards_total=6).write(out)
    state = read_state(out)
    assert state.rows["rows_done"] == 0 and state.rows_in_flight == 16
    assert state.in_flight_text == "16 generated in shards never committed (lost; generated again on resume)"
