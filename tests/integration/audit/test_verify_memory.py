"""`verify`'s memory does not grow with the job's rows (issue 23): the driver side, in process,
on synthetic outputs of two sizes, measured both in Python's allocator (tracemalloc peak) and
in Arrow's (the peak of a memory pool of its own). The reader's batch sizes are made small, and
the manifest is written in small row groups and pages (Parquet decodes a page, a dictionary, at
a time: up to ~1 MB however many rows), so both sizes are many batches, tasks, row groups and
pages long: what is left can only grow with rows."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synthetic_output import arrow_pool, build_output

SMALL, LARGE = 2_000, 20_000


@pytest.fixture
def small_batches(monkeypatch):
    import synthetic_output

    import sdbatch.audit.index_check as index_check
    import sdbatch.audit.object_check as object_check
    import sdbatch.output.index as index

    write_manifest = synthetic_output._manifest

    def small_pages(path: Path, rows: int) -> None:
        write_manifest(path, rows)
        pq.write_table(pq.read_table(path), path, row_group_size=1_000, data_page_size=1 << 14, use_dictionary=False)

    monkeypatch.setattr(synthetic_output, "_manifest", small_pages)
    monkeypatch.setattr(index, "MERGE_ROW_GROUP_ROWS", 2_000)  # the builder merges with it
    monkeypatch.setattr(index, "INDEX_BATCH_ROWS", 1_000)
    monkeypatch.setattr(index_check, "INDEX_BATCH_ROWS", 1_000)
    monkeypatch.setattr(object_check, "TASK_ROWS", 500)


def peaks(out: Path, listing_only: bool = False, sample: int = 0) -> tuple[int, int]:
    """(Python peak, Arrow peak) in bytes of an in-process verify of ``out`` (full, listing only,
    or a sample)."""
    from sdbatch.audit.verify import verify

    with arrow_pool() as pool:
        tracemalloc.start()
        try:
            report = verify(str(out), workers=0, sample=sample, seed=1, listing_only=listing_only)
            python_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert report.clean and report.ok == report.rows_in_index - report.rows_failed, report.render()
    return python_peak, pool.max_memory()


def test_verify_memory_does_not_grow_with_rows(small_batches, tmp_path):
    small_out = build_output(tmp_path / "small", SMALL, rows_per_shard=250, failed_every=97)
    peaks(small_out)  # once first: what verify imports and caches on its first call is not a cost of rows
    small = peaks(small_out)
    large = peaks(build_output(tmp_path / "large", LARGE, rows_per_shard=250, failed_every=97))
    assert large[0] < 1.5 * small[0], f"Python peak {small[0]:,} B at {SMALL:,} rows, {large[0]:,} B at {LARGE:,}"
    assert large[1] < 1.5 * small[1], f"Arrow peak {small[1]:,} B at {SMALL:,} rows, {large[1]:,} B at {LARGE:,}"


def test_listing_only_verify_memory_does_not_grow_with_rows(small_batches, tmp_path):
    """``--listing-only``: the index against one listing per shard and one of metadata/, no
    object and no commit read."""
    small_out = build_output(tmp_path / "small", SMALL, rows_per_shard=250, failed_every=97)
    peaks(small_out, listing_only=True)
    small = peaks(small_out, listing_only=True)
    large = peaks(build_output(tmp_path / "large", LARGE, rows_per_shard=250, failed_every=97), listing_only=True)
    assert large[0] < 1.5 * small[0], f"Python peak {small[0]:,} B at {SMALL:,} rows, {large[0]:,} B at {LARGE:,}"
    assert large[1] < 1.5 * small[1], f"Arrow peak {small[1]:,} B at {SMALL:,} rows, {large[1]:,} B at {LARGE:,}"


def test_sampled_verify_memory_does_not_grow_with_rows(small_batches, tmp_path):
    """``--sample``: the sample drawn in a pass of its own, then the listing-only checks and the
    sample's objects and commits: the same number of rows read at both sizes."""
    small_out = build_output(tmp_path / "small", SMALL, rows_per_shard=250, failed_every=97)
    peaks(small_out, sample=50)
    small = peaks(small_out, sample=50)
    large = peaks(build_output(tmp_path / "large", LARGE, rows_per_shard=250, failed_every=97), sample=50)
    assert large[0] < 1.5 * small[0], f"Python peak {small[0]:,} B at {SMALL:,} rows, {large[0]:,} B at {LARGE:,}"
    assert large[1] < 1.5 * small[1], f"Arrow peak {small[1]:,} B at {SMALL:,} rows, {large[1]:,} B at {LARGE:,}"
