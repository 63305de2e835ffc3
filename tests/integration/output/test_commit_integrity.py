"""What the merge, the resume and the report trust in OUT (issue 21: findings 2, 6, 7, 12, 14):
a job is finished only when every shard of its plan has its commit and the commits hold exactly
the manifest's rows; only names the plan makes are commits; a file sdbatch did not write (a
non-Parquet "commit", a user's ``report.html``) is never deleted or overwritten; a directory or a
dangling link at an image key fails that row, not its shard; a manifest too wide for the index
is refused at validation. Each test fails on the code before the fix (commit 439cfa8)."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_index, sdbatch_cli, write_manifest

from integration.chaos import chaos_env
from sdbatch.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_ROWS_FAILED, EXIT_SHARDS_FAILED

FAST = ["--model", "builtin:tiny", "--steps", "2", "--rows-per-shard", "2", "--batch-size", "2", "--workers", "1"]
IDS = ["t0", "t1", "t2", "t3"]  # shard 00000: t0, t1; shard 00001: t2, t3


def said(result) -> str:
    return " ".join((result.stdout + result.stderr).split())


@pytest.fixture(scope="module")
def half_done(ray_address, tmp_path_factory) -> tuple[Path, Path]:
    """A manifest of 4 rows (2 shards) and an OUT where shard 00000 is committed and shard
    00001 failed (exit 5): the state a resume starts from. Tests work on copies of OUT."""
    base = tmp_path_factory.mktemp("half-done")
    manifest = write_manifest(base / "m.parquet", [{"id": i, "prompt": f"a red circle {i}", "seed": 10 + n}
                                                    for n, i in enumerate(IDS)])
    out = base / "out"
    markers = base / "markers"
    markers.mkdir()
    first = sdbatch_cli(ray_address, "submit", manifest, "--out", out, *FAST,
                        env=chaos_env(markers, broken_shards=["00001"]))
    assert first.returncode == EXIT_SHARDS_FAILED, said(first)
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["00000.parquet"]
    return manifest, out


def resume_copy(half_done, tmp_path: Path) -> tuple[Path, Path]:
    manifest, out = half_done
    copy = tmp_path / "out"
    shutil.copytree(out, copy, symlinks=True)
    (copy / "_sdbatch" / "lock.json").unlink(missing_ok=True)
    return manifest, copy


def test_a_commit_deleted_mid_run_leaves_the_job_unfinished(run_cli, tmp_path):
    """Finding 2: the merge reads the plan's shards, not a listing: a commit deleted after its
    shard was committed is missing (exit 5 naming it), no _SUCCESS, and the rerun regenerates it."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": i, "prompt": f"a red circle {i}", "seed": 10 + n}
                                                      for n, i in enumerate(IDS)])
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    commit = out / "metadata" / "00000.parquet"
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_cli, "submit", manifest, "--out", out, *FAST,
                          env=chaos_env(markers, hold_shards=["00001"]))
        deadline = time.monotonic() + 300
        while not (commit.exists() and any(markers.glob("hold-00001-*"))):
            assert time.monotonic() < deadline and not run.done(), run.result() if run.done() else "timed out"
            time.sleep(0.2)
        commit.unlink()  # shard 00000 was committed; its commit is gone before the merge
        (markers / "release").touch()
        done = run.result()
    assert done.returncode == EXIT_SHARDS_FAILED, said(done)
    assert "metadata/00000.parquet missing" in said(done) and "(rows 0, 1)" in said(done), said(done)
    assert not (out / "_SUCCESS").exists() and not (out / "index.parquet").exists()
    status = run_cli("status", out)
    assert "finished" not in said(status), said(status)

    again = run_cli("submit", manifest, "--out", out, *FAST)
    assert again.returncode == EXIT_OK, said(again)
    assert sorted(r["id"] for r in load_index(out)) == IDS


def test_only_the_plans_names_are_commits_and_a_copied_commit_is_refused(run_cli, half_done, tmp_path):
    """Finding 2: ``metadata/0.parquet`` (a copy of commit 00000) is not a commit of this
    job's plan: never read, never counted; a copy at a plan name (00001) repeats rows and lacks
    its own, so the job is not finished (exit 5 naming the commit, the rows repeated and missing)."""
    manifest, out = resume_copy(half_done, tmp_path)
    metadata = out / "metadata"
    shutil.copy(metadata / "00000.parquet", metadata / "0.parquet")
    shutil.copy(metadata / "00000.parquet", metadata / "00001.parquet")

    wrong = run_cli("submit", manifest, "--out", out, *FAST)
    assert wrong.returncode == EXIT_SHARDS_FAILED, said(wrong)
    assert "metadata/00001.parquet holds 2 rows that are not its own (ids t0, t1" in said(wrong), said(wrong)
    assert "2 manifest rows are in no commit (rows 2, 3)" in said(wrong), said(wrong)
    assert "2 shards already committed" not in said(wrong) and "3 shards" not in said(wrong), said(wrong)
    assert not (out / "_SUCCESS").exists() and not (out / "index.parquet").exists()

    (metadata / "00001.parquet").unlink()
    resumed = run_cli("submit", manifest, "--out", out, *FAST)
    assert resumed.returncode == EXIT_OK, said(resumed)
    assert "1 shard already committed" in said(resumed), said(resumed)
    assert sorted(r["id"] for r in load_index(out)) == IDS  # each once: 0.parquet was not read
    assert (metadata / "0.parquet").read_bytes() == (metadata / "00000.parquet").read_bytes()  # nor deleted


def test_a_file_sdbatch_did_not_write_at_a_commit_key_is_refused_not_deleted(run_cli, half_done, tmp_path):
    """Finding 7: a non-Parquet file at ``metadata/00001.parquet`` is not a commit: the job is
    refused (exit 2 naming it) and the file is left as it was."""
    manifest, out = resume_copy(half_done, tmp_path)
    theirs = out / "metadata" / "00001.parquet"
    theirs.write_bytes(b"my notes, not a commit")

    refused = run_cli("submit", manifest, "--out", out, *FAST)
    assert refused.returncode == EXIT_BAD_INPUT, said(refused)
    assert "metadata/00001.parquet" in said(refused) and "removed it" not in said(refused), said(refused)
    assert "Traceback" not in said(refused)
    assert theirs.read_bytes() == b"my notes, not a commit"
    assert not (out / "_SUCCESS").exists()


def test_a_directory_or_dangling_link_at_an_image_key_fails_that_row(run_cli, half_done, tmp_path):
    """Finding 14: a directory at t2's image key and a link to nothing at t3's fail those rows
    (exit 3, the key named in the row's error); the shard commits, the job finishes."""
    manifest, out = resume_copy(half_done, tmp_path)
    shard = out / "images" / "00001"
    shard.mkdir(parents=True, exist_ok=True)
    (shard / "t2.png").mkdir()
    (shard / "t3.png").symlink_to("nothing-here.png")

    resumed = run_cli("submit", manifest, "--out", out, *FAST)
    assert resumed.returncode == EXIT_ROWS_FAILED, said(resumed)
    rows = {r["id"]: r for r in load_index(out)}
    assert [rows[i]["status"] for i in IDS] == ["ok", "ok", "failed", "failed"]
    assert "images/00001/t2.png" in rows["t2"]["error"] and "directory" in rows["t2"]["error"], rows["t2"]["error"]
    assert "images/00001/t3.png" in rows["t3"]["error"] and "link" in rows["t3"]["error"], rows["t3"]["error"]
    assert (shard / "t2.png").is_dir() and os.readlink(shard / "t3.png") == "nothing-here.png"  # left alone


def test_a_users_report_html_is_never_overwritten(run_cli, half_done, tmp_path):
    """Finding 6: an OUT holding a report.html sdbatch did not write is refused like any
    foreign object, and ``sdbatch report`` replaces only this job's own report."""
    manifest, _ = half_done
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "report.html").write_text("<p>my report</p>")
    refused = run_cli("submit", manifest, "--out", empty, *FAST)
    assert refused.returncode == EXIT_BAD_INPUT and "report.html" in said(refused), said(refused)
    assert (empty / "report.html").read_text() == "<p>my report</p>"
    assert not (empty / "_sdbatch").exists() or not (empty / "_sdbatch" / "job.json").exists()

    _, out = resume_copy(half_done, tmp_path)
    assert run_cli("report", out).returncode == EXIT_OK  # this job's own report is replaced
    (out / "report.html").write_text("<p>mine now</p>")
    again = run_cli("report", out)
    assert again.returncode == EXIT_BAD_INPUT and "report.html" in said(again), said(again)
    assert (out / "report.html").read_text() == "<p>mine now</p>"


def test_a_manifest_wider_than_the_limit_is_refused_and_a_wide_index_merges(run_cli, tmp_path):
    """Finding 12: a manifest with more columns than ``limits.max_columns`` is refused by
    ``validate`` (exit 2 naming the limit), and an index that wide merges with every column
    kept. (Its merge time is a benchmark figure: ``bench_index_merge.py --wide-columns``.)"""
    from sdbatch.data.index import index_schema
    from sdbatch.output.commits import records_to_parquet
    from sdbatch.output.index import merge_index
    from sdbatch.storage.local import LocalStorage

    wide = {"id": ["a", "b"], "prompt": ["x", "y"], **{f"label_{n}": [n, n] for n in range(20_000)}}
    manifest = tmp_path / "wide.parquet"
    pq.write_table(pa.table(wide), manifest)
    refused = run_cli("validate", manifest)
    assert refused.returncode == EXIT_BAD_INPUT, said(refused)
    assert "20,002 columns" in said(refused) and "limits.max_columns" in said(refused), said(refused)
    assert "Traceback" not in said(refused)

    storage = LocalStorage(tmp_path / "out")
    labels = {f"label_{n}": pa.int64() for n in range(20_000)}
    records = [{"id": "a", "row": 0, "status": "ok", **{name: 1 for name in labels}}]
    storage.put("metadata/00000.parquet", records_to_parquet(records, index_schema(labels), "fp"))
    summary = merge_index(storage, ["00000"], 1, labels, "fp")
    merged = pq.read_table(tmp_path / "out" / "index.parquet")
    assert summary.rows == merged.num_rows == 1
    assert [name for name in merged.column_names if name.startswith("label_")] == list(labels)
    assert all(merged.column(name)[0].as_py() == 1 for name in labels)
