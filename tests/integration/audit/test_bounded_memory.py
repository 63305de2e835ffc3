"""The readers of a job's index in memory that does not grow with its rows (issue 23): report,
reproduce's lookup, stats and ``--new-run``'s check, each measured on a synthetic finished output
of 2,000 and of 20,000 rows (``tests/synthetic_output.py``; no Ray), read in batches of 500
rows from row groups of 1,000, so both sizes span many batches. Python's allocations
(tracemalloc's peak) and Arrow's (``pa.total_allocated_bytes`` sampled while the call runs) of
the larger must stay within a small factor of the smaller's (``assert_bounded``). And ``reproduce`` of a row in the
last shard of a 50,000-row index finds the row and its batch-mates.
"""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from synthetic_output import BATCH_SIZE, build_output, row_id

from sdbatch.audit.job_output import JobOutput, open_job
from sdbatch.storage.local import LocalStorage

SMALL, LARGE = 2_000, 20_000
SHARD_ROWS = 250


def batch_of(row: int) -> list[str]:
    """The ids of ``row``'s batch: batches of BATCH_SIZE counted from its shard's first row."""
    first = row - (row % SHARD_ROWS) % BATCH_SIZE
    return [row_id(i) for i in range(first, min(first + BATCH_SIZE, row - row % SHARD_ROWS + SHARD_ROWS))]
GROWTH = 1.5  # the most the larger output may take, as a multiple of the smaller's (plus the reader's growth)
ROW_GROUP_ROWS = 1_000  # sdbatch writes 16,384: here small, so that both sizes span many


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[int, Path]:
    """Finished webdataset outputs (a tar per shard of 500 rows, one row in 97 failed) of both sizes."""
    root = tmp_path_factory.mktemp("bounded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sdbatch.output.index.MERGE_ROW_GROUP_ROWS", ROW_GROUP_ROWS)
        return {rows: build_output(root / str(rows), rows, fmt="webdataset", rows_per_shard=SHARD_ROWS, failed_every=97)
                for rows in (SMALL, LARGE)}


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr("sdbatch.output.index.INDEX_BATCH_ROWS", 500)


def peaks(call: Callable[[], Any]) -> tuple[int, int]:
    """Python's peak allocation (tracemalloc) and Arrow's (sampled every millisecond) during ``call``."""
    arrow_start, arrow_peak, done = pa.total_allocated_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            arrow_peak[0] = max(arrow_peak[0], pa.total_allocated_bytes() - arrow_start)

    sampler = threading.Thread(target=sample)
    tracemalloc.start()
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
        _, python_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return python_peak, arrow_peak[0]


def both_sizes(call: Callable[[JobOutput], Any], outputs: dict[int, Path]) -> tuple[tuple[int, int], tuple[int, int], Any]:
    """The peaks of ``call`` of each output (opened first) and what it gave for the larger."""
    jobs = {rows: open_job(str(out)) for rows, out in outputs.items()}
    call(jobs[SMALL])  # first: lazy imports and caches are not the rows' memory
    small = peaks(lambda: call(jobs[SMALL]))
    result: list[Any] = []
    large = peaks(lambda: result.append(call(jobs[LARGE])))
    return small, large, result[0]


def assert_bounded(measure: Callable[[JobOutput], Any], outputs: dict[int, Path]) -> Any:
    """``measure`` of each output, opened first, takes at most GROWTH times as much at LARGE
    as at SMALL (Arrow: as at least 1 MiB); returns what it gave for the larger output."""
    (small_py, small_arrow), (large_py, large_arrow), result = both_sizes(measure, outputs)
    assert large_py < GROWTH * small_py, f"Python peak {small_py:,} B at {SMALL:,} rows, {large_py:,} B at {LARGE:,}"
    assert large_arrow < GROWTH * max(small_arrow, 1 << 20), (
        f"Arrow peak {small_arrow:,} B at {SMALL:,} rows, {large_arrow:,} B at {LARGE:,}")
    return result


def test_reading_the_index_a_batch_at_a_time_is_bounded(outputs):
    """What every reader rests on: no column chunk kept while the file is open (pyarrow's
    pre_buffer would keep them all), nothing per row."""
    assert assert_bounded(lambda job: sum(b.num_rows for b in job.index.batches()), outputs) == LARGE


def test_the_report_is_computed_in_bounded_memory(outputs):
    from sdbatch.audit.report import MAX_FAILURES_SHOWN, render_report

    page = assert_bounded(render_report, outputs)
    assert f"Failures ({LARGE // 97})" in page and page.count("<figure>") == 24
    assert page.count('<td class="error">synthetic failure of row') == MAX_FAILURES_SHOWN


@pytest.fixture(scope="module")
def unfinished(outputs, tmp_path_factory) -> dict[int, Path]:
    """The same outputs as a run that ended unfinished leaves them: commits, no index, no _SUCCESS."""
    import shutil

    root = tmp_path_factory.mktemp("unfinished")
    copies = {rows: Path(shutil.copytree(out, root / str(rows))) for rows, out in outputs.items()}
    for out in copies.values():
        (out / "index.parquet").unlink()
        (out / "_SUCCESS").unlink()
    return copies


def test_the_report_of_an_unfinished_job_reads_its_commits_in_bounded_memory(unfinished, monkeypatch):
    """The report at the end of a run that did not finish: the commits, read several at once
    (``COMMIT_READ_AHEAD``), in memory that does not grow with them, the same page as finished."""
    import re

    monkeypatch.setattr("sdbatch.output.index.COMMIT_READ_AHEAD", 4)  # pinned under the smaller output's 8 commits

    from sdbatch.audit.report import MAX_FAILURES_SHOWN, render_report

    assert open_job(str(unfinished[LARGE])).index_source == f"{LARGE // SHARD_ROWS} committed shard indexes (job unfinished)"
    page = assert_bounded(render_report, unfinished)
    assert f"Failures ({LARGE // 97})" in page and page.count("<figure>") == 24
    assert page.count('<td class="error">synthetic failure of row') == MAX_FAILURES_SHOWN
    ok = [row_id(i) for i in range(LARGE) if i % 97 != 96]
    assert re.findall(r'alt="([^"]+)"', page) == ok[::len(ok) // 24][:24]  # the sheet's rows, in row order


def test_the_contact_sheet_shows_ok_rows_spread_evenly_over_the_job(outputs):
    import re

    from sdbatch.audit.report import render_report

    page = render_report(open_job(str(outputs[SMALL])))
    ok = [row_id(i) for i in range(SMALL) if i % 97 != 96]
    assert re.findall(r'alt="([^"]+)"', page) == ok[::len(ok) // 24][:24]  # every 82nd ok row


def test_stats_are_computed_in_bounded_memory(outputs, monkeypatch):
    from sdbatch.datasets.stats import job_stats

    monkeypatch.setattr("sdbatch.datasets.stats.QUANTILE_SAMPLE", 1_000)  # below both sizes: bounded
    stats = assert_bounded(lambda job: job_stats(job.index), outputs)
    assert (stats["rows"], stats["failed"], stats["labels"]["label"]["3"]) == (LARGE, LARGE // 97, LARGE // 10)
    assert stats["scores"]["generate_seconds"] == {"count": LARGE, "mean": 0.25, "min": 0.25, "p5": 0.25,
                                                   "p50": 0.25, "p95": 0.25, "max": 0.25}


def test_reproduce_finds_its_row_and_batch_mates_in_bounded_memory(outputs):
    from sdbatch.audit.reproduce import Reproducer

    def lookup(job: JobOutput) -> list[str]:
        reproducer = Reproducer(job)
        entry = reproducer.look_up(row_id(job.job.manifest.num_rows - 2))
        return sorted(job.index.rows(entry["batch_rows"]))

    assert assert_bounded(lookup, outputs) == batch_of(LARGE - 2)  # in the last shard, and ok


def test_new_runs_check_of_the_old_jobs_objects_is_bounded(outputs):
    from sdbatch.output.claim import _old_job_objects

    def owned(job: JobOutput) -> set[str]:
        return set(_old_job_objects(job.storage, job.job))

    keys = assert_bounded(owned, outputs)  # its answer holds the objects (here a tar per shard), not the rows
    assert {k for k in keys if k.startswith("shards/")} == {f"shards/{n:05d}.tar" for n in range(LARGE // SHARD_ROWS)}
    assert len([k for k in keys if k.startswith("metadata/")]) == LARGE // SHARD_ROWS and "index.parquet" in keys


@pytest.fixture(scope="module")
def file_outputs(tmp_path_factory) -> dict[int, Path]:
    """Finished outputs of both sizes in the files layout (an object per ok row: what ``--new-run``'s
    plan lists grows with the rows), one row in 97 failed."""
    root = tmp_path_factory.mktemp("bounded-files")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sdbatch.output.index.MERGE_ROW_GROUP_ROWS", ROW_GROUP_ROWS)
        return {rows: build_output(root / str(rows), rows, rows_per_shard=SHARD_ROWS, failed_every=97)
                for rows in (SMALL, LARGE)}


def test_new_runs_clear_cut_short_after_the_commits_is_finished_by_its_plan(file_outputs, tmp_path, monkeypatch):
    """A clear whose deletes stop after the commits: the images are named only by the plan (and
    the index) now, and the next ``clear_job`` deletes every one of them, then the plan itself."""
    import shutil

    from sdbatch.output.claim import CLEAR_PREFIX, clear_job
    from sdbatch.storage.base import StorageError

    monkeypatch.setattr("sdbatch.output.claim.CLEAR_PART_KEYS", 1_000)
    out = Path(shutil.copytree(file_outputs[SMALL], tmp_path / "cut"))
    (out / "index.parquet").unlink()  # only the plan names the images once the commits are gone
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    storage, calls = LocalStorage(str(out)), [0]
    delete_many = LocalStorage.delete_many

    def fail_after_the_commits(self: LocalStorage, keys: list[str]) -> None:
        calls[0] += 1
        if keys and not keys[0].startswith("metadata/"):
            raise StorageError("storage outage (test)")
        delete_many(self, keys)

    with monkeypatch.context() as patched:
        patched.setattr(LocalStorage, "delete_many", fail_after_the_commits)
        with pytest.raises(StorageError):
            clear_job(storage)
    assert not (out / "metadata").exists() and len(images) == SMALL - SMALL // 97
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == images
    assert [k for k in storage.list(CLEAR_PREFIX) if k.endswith("plan.json")]
    clear_job(storage)
    assert not (out / "images").exists() and not (out / "_sdbatch").exists()


def test_a_clear_cut_short_by_an_sdbatch_before_the_plan_in_parts_is_finished(file_outputs, tmp_path):
    """An older sdbatch wrote its whole plan to ``_sdbatch/clear.json`` and deleted the commits
    first: cut short there, only that file names the images. ``clear_job`` carries it out (job.json
    last) and removes it; a user's file is kept."""
    import json
    import shutil

    from sdbatch.output.claim import LEGACY_CLEAR_KEY, clear_job
    from sdbatch.output.documents import JobRecord

    out = Path(shutil.copytree(file_outputs[SMALL], tmp_path / "legacy"))
    storage = LocalStorage(str(out))
    owned = storage.list()  # every object of the job, as that sdbatch's plan named them
    (out / "notes.txt").write_text("the user's")
    job = JobRecord.read(storage)
    assert job is not None
    (out / LEGACY_CLEAR_KEY).write_text(json.dumps({"fingerprint": job.fingerprint, "keys": owned}))
    shutil.rmtree(out / "metadata")  # the old clear's first deletes
    (out / "index.parquet").unlink()
    assert clear_job(storage) == len(owned)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*")] == ["notes.txt"]


def test_reproduce_of_a_row_in_the_last_shard_of_a_50000_row_index(tmp_path):
    from sdbatch.audit.reproduce import Reproducer

    rows, target = 50_000, 49_997  # its batch: 49,992 … 49,999
    out = build_output(tmp_path, rows, objects=False)  # shards of 1,000 rows, in row groups of 16,384
    result = Reproducer(open_job(str(out))).reproduce(row_id(target))
    assert result.id == row_id(target) and result.key == f"images/00049/{row_id(target)}.png"
    assert result.batch_rows == [row_id(i) for i in range(49_992, rows)] and result.batch_rebuilt
    assert result.record_source == "index" and result.stored_sha256 is None  # no objects: rebuilt from the index
    assert not result.match and result.data.startswith(b"\x89PNG")  # regenerated (the index's sha256 is made up)
