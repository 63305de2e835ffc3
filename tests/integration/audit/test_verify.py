"""`sdbatch verify`: every index row's object exists with its recorded size and sha256; missing,
mismatched and orphan objects are reported; `--regenerate K` regenerates rows and reports drift.
Local output (files and webdataset layouts) and S3 output (moto)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import sdbatch_cli as cli
from conftest import write_manifest

FAST = ["--model", "builtin:tiny", "--steps", "3", "--rows-per-shard", "6", "--batch-size", "4"]


def rows(n: int = 12) -> list[dict]:
    return [{"id": f"v{i:02d}", "prompt": f"a blue triangle {i}", "seed": 50 + i, "label": f"L{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def job_out(ray_address, tmp_path_factory):
    """A finished 12-row job (2 shards, files layout) — copy it before changing it."""
    base = tmp_path_factory.mktemp("verify")
    manifest = write_manifest(base / "m.parquet", rows())
    out = base / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, *FAST, "--workers", "1")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def job_copy(job_out, tmp_path):
    work = tmp_path / "out"
    shutil.copytree(job_out, work)
    return work, {r["id"]: r for r in pq.read_table(work / "index.parquet").to_pylist()}


def test_clean_job_verifies(ray_address, job_out):
    result = cli(ray_address, "verify", job_out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 objects present with the recorded size and sha256" in result.stdout
    assert "result     clean" in result.stdout


def test_missing_corrupted_and_orphan_objects(ray_address, job_copy):
    work, index = job_copy
    (work / index["v02"]["key"]).unlink()  # deleted image
    corrupt = work / index["v07"]["key"]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    corrupt.write_bytes(bytes(data))
    (work / "images" / "00001" / "stray.png").write_bytes(b"leftover of a dead attempt")

    result = cli(ray_address, "verify", work)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "missing    1" in out and f"v02  {index['v02']['key']}" in out
    assert "mismatched 1" in out and "v07" in out and "sha256 differs" in out
    assert "orphans    1" in out and "images/00001/stray.png" in out
    assert "10 objects present" in out and "PROBLEMS FOUND" in out


def test_orphans_alone_are_not_an_error(ray_address, job_copy):
    from sdbatch.audit.verify import verify

    work, _ = job_copy
    (work / "images" / "00000" / "extra.png").write_bytes(b"x")
    (work / "images" / "00009").mkdir()
    (work / "images" / "00009" / "v99.png").write_bytes(b"an uncommitted shard's image")
    report = verify(str(work))
    assert report.clean and report.ok == 12
    assert report.orphans == ["images/00000/extra.png", "images/00009/v99.png"]
    result = cli(ray_address, "verify", work)
    assert result.returncode == 0 and "orphans    2" in result.stdout and "not an error" in result.stdout


def test_unfinished_job_is_verified_from_committed_shard_indexes(job_copy):
    from sdbatch.audit.verify import verify

    work, index = job_copy
    for name in ("index.parquet", "_SUCCESS", "metadata/00001.parquet"):
        (work / name).unlink()
    report = verify(str(work))
    assert report.clean and not report.finished
    assert report.rows_in_index == report.ok == 6 and report.rows_total == 12
    assert report.orphans == sorted(r["key"] for r in index.values() if r["shard"] == "00001")


def cut_index(work, keep: int) -> None:
    """index.parquet cut to its first ``keep`` rows, still stamped as this job's."""
    table = pq.read_table(work / "index.parquet")
    pq.write_table(table.slice(0, keep), work / "index.parquet")


def test_an_incomplete_index_is_not_clean_and_is_rebuilt_from_the_commits(ray_address, job_copy):
    """Issue 12 finding 4: an index cut to 2 of 12 rows is reported (job.json's row count,
    the manifest's ids, the commits' rows), its rows' images are not called orphans safe to
    delete without that problem, and --rebuild-index restores it from the commits."""
    work, index = job_copy
    cut_index(work, 2)
    result = cli(ray_address, "verify", work)
    text = " ".join(result.stdout.split())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "index.parquet holds 2 rows, the job's manifest 12 (job.json)" in text
    assert "10 committed rows are not in index.parquet" in text
    assert "10 manifest rows are not in the index (e.g. v02, v03" in text
    assert "PROBLEMS FOUND" in text

    rebuilt = cli(ray_address, "verify", work, "--rebuild-index")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "rebuilt index.parquet from 2 commits (12 rows)" in rebuilt.stdout and "orphans    0" in rebuilt.stdout
    assert {r["id"]: r for r in pq.read_table(work / "index.parquet").to_pylist()} == index


def test_a_corrupt_index_is_reported_and_rebuilt(ray_address, job_copy):
    work, index = job_copy
    (work / "index.parquet").write_bytes(b"PAR1 not a parquet file")
    result = cli(ray_address, "verify", work)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "index.parquet is not readable Parquet" in result.stdout and "rebuild it with --rebuild-index" in result.stdout
    assert cli(ray_address, "verify", work, "--rebuild-index").returncode == 0
    assert len(pq.read_table(work / "index.parquet")) == len(index)


def test_a_refused_resume_says_what_changed(ray_address, job_out, tmp_path):
    """Issue 11: a refused resume names the spec keys (and manifest, model) that changed."""
    manifest = next(job_out.parent.glob("*.parquet"))
    result = cli(ray_address, "submit", manifest, "--out", job_out, *FAST, "--workers", "1", "--steps", "4",
                 "--guidance-scale", "5")
    said = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert "already holds a different job: the settings defaults.steps (3 → 4), defaults.guidance_scale (7.5 → 5.0)" in said
    assert "the manifest" not in said and "the model" not in said
    other = write_manifest(tmp_path / "other.parquet", rows(11))
    result = cli(ray_address, "submit", other, "--out", job_out, *FAST, "--workers", "1")
    assert result.returncode == 2 and "the manifest (" in result.stderr and "11 rows" in result.stderr


def test_regenerate_three_rows_of_a_clean_job(ray_address, job_out):
    result = cli(ray_address, "verify", job_out, "--regenerate", "3", "--seed", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "regenerate 3 rows (seed 1): 3 exact byte matches, 0 drifted" in result.stdout
    assert result.stdout.count("bytes match") == 3


def test_bad_out_exits_2(ray_address, tmp_path):
    result = cli(ray_address, "verify", tmp_path / "no-job-here")
    assert result.returncode == 2 and "no sdbatch job" in result.stderr


def test_webdataset_output(ray_address, tmp_path):
    from sdbatch.audit.reproduce import reproduce_row
    from sdbatch.audit.verify import verify

    manifest = write_manifest(tmp_path / "m.parquet", rows(8))
    out = tmp_path / "wds"
    result = cli(ray_address, "submit", manifest, "--out", out, *FAST, "--workers", "1", "--format", "webdataset")
    assert result.returncode == 0, result.stderr
    report = verify(str(out))
    assert report.clean and report.ok == 8 and report.orphans == []
    assert reproduce_row(str(out), "v07").match

    # one member of the second tar changed: that row is mismatched, the rest stay ok
    tar_path = out / "shards" / "00001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            if m.name == "v06.png":
                data = data[:-20] + bytes(20)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buffer.getvalue())
    report = verify(str(out))
    assert [m[0] for m in report.mismatched] == ["v06"] and report.ok == 7 and not report.clean


def test_verify_and_reproduce_on_s3_output(ray_address, s3_bucket, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    manifest = write_manifest(tmp_path / "m.parquet", rows(8))
    out = f"s3://{bucket}/run"
    result = cli(ray_address, "submit", manifest, "--out", out, *FAST, "--workers", "1", "--s3-endpoint", endpoint)
    assert result.returncode == 0, result.stderr
    check = cli(ray_address, "verify", out, "--s3-endpoint", endpoint)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "8 objects present" in check.stdout and "result     clean" in check.stdout

    again = cli(ray_address, "reproduce", out, "v05", "--s3-endpoint", endpoint, "-o", tmp_path / "v05.png")
    assert again.returncode == 0, again.stdout + again.stderr
    stored = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=bucket, Key="run/images/00000/v05.png")
    assert (tmp_path / "v05.png").read_bytes() == stored["Body"].read()

    boto3.client("s3", endpoint_url=endpoint).delete_object(Bucket=bucket, Key="run/images/00001/v06.png")
    gone = cli(ray_address, "verify", out, "--s3-endpoint", endpoint)
    assert gone.returncode == 1 and "missing    1" in gone.stdout and "images/00001/v06.png" in gone.stdout
