"""Jobs whose manifest, init images, model and output all live on a real S3-compatible server
(moto on 127.0.0.1), run through the CLI; storage faults injected with a botocore hook."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from integration.faults import fault_env, read_counts
from sdbatch.models.builtin import resolve_builtin

FAST = ["--steps", "3", "--rows-per-shard", "4", "--batch-size", "2"]


def faults_injected(counts_dir) -> int:
    return sum(n for per_op in read_counts(counts_dir).values() for kind, n in per_op.items() if kind != "requests")


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_job_inputs(endpoint: str, bucket: str, n: int = 12) -> tuple[str, str]:
    """Manifest (with img2img rows whose init images are relative to it) and the tiny model."""
    s3 = client(endpoint)
    buffer = io.BytesIO()
    Image.new("RGB", (80, 48), (30, 200, 40)).save(buffer, format="PNG")
    s3.put_object(Bucket=bucket, Key="inputs/init/green.png", Body=buffer.getvalue())
    rows = [
        {"id": f"s{i:02d}", "prompt": "a small red circle", "seed": i,
         "init_image": "init/green.png" if i % 3 == 0 else None, "strength": 0.5 if i % 3 == 0 else None}
        for i in range(n)
    ]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    s3.put_object(Bucket=bucket, Key="inputs/manifest.parquet", Body=sink.getvalue())
    folder = resolve_builtin("builtin:tiny")
    for path in folder.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"models/tiny/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/inputs/manifest.parquet", f"s3://{bucket}/models/tiny"


def read_s3_index(endpoint: str, bucket: str, prefix: str) -> list[dict]:
    body = client(endpoint).get_object(Bucket=bucket, Key=f"{prefix}/index.parquet")["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pylist()


def assert_complete(endpoint: str, bucket: str, prefix: str, n: int) -> list[dict]:
    s3 = client(endpoint)
    index = read_s3_index(endpoint, bucket, prefix)
    assert sorted(r["id"] for r in index) == [f"s{i:02d}" for i in range(n)]
    for r in index:
        assert r["status"] == "ok", r["error"]
        data = s3.get_object(Bucket=bucket, Key=f"{prefix}/{r['key']}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
    return index


def test_full_job_on_s3_with_status(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    manifest, model = upload_job_inputs(endpoint, bucket)
    out = f"s3://{bucket}/runs/one"
    env = {"SDBATCH_MODEL_CACHE": str(tmp_path / "cache")}
    result = run_cli("submit", manifest, "--out", out, "--model", model, "--s3-endpoint", endpoint, *FAST, env=env)
    assert result.returncode == 0, result.stderr
    index = assert_complete(endpoint, bucket, "runs/one", 12)
    img2img = [r for r in index if r["init_image"]]
    assert len(img2img) == 4 and all(r["init_image"] == f"s3://{bucket}/inputs/init/green.png" for r in img2img)
    job = client(endpoint).get_object(Bucket=bucket, Key="runs/one/_sdbatch/job.json")["Body"].read().decode()
    assert "testing" not in job  # no credentials (the fake key id and secret are "testing")
    assert "testing" not in result.stderr + result.stdout

    status = run_cli("status", out, "--s3-endpoint", endpoint)
    assert status.returncode == 0, status.stderr
    assert "3/3 committed" in status.stdout and "finished" in status.stdout


def test_missing_bucket_is_reported_before_any_model_loads(run_cli, s3_bucket, small_manifest):
    endpoint, _ = s3_bucket
    result = run_cli("submit", small_manifest, "--out", "s3://no-such-bucket-here/x", "--s3-endpoint", endpoint,
                     "--model", "builtin:tiny")
    assert result.returncode == 2
    assert "no-such-bucket-here" in result.stderr
    assert "testing" not in result.stderr


def test_killed_driver_resumes_on_s3(ray_address, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    manifest, model = upload_job_inputs(endpoint, bucket, n=24)
    args = [sys.executable, "-m", "sdbatch", "submit", manifest, "--out", f"s3://{bucket}/runs/k",
            "--model", model, "--s3-endpoint", endpoint, *FAST, "--workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "SDBATCH_MODEL_CACHE": str(tmp_path / "cache")}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    s3 = client(endpoint)

    def committed() -> dict[str, str]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="runs/k/metadata/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listing}

    end = time.time() + 300
    while len(committed()) < 2:
        assert driver.poll() is None and time.time() < end, driver.communicate()
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = committed()
    assert 2 <= len(before) < 6
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert {k: v for k, v in committed().items() if k in before} == before  # committed shards untouched
    assert_complete(endpoint, bucket, "runs/k", 24)


def test_storage_faults_on_puts_lose_nothing(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    manifest, model = upload_job_inputs(endpoint, bucket, n=16)
    counts = tmp_path / "counts"
    counts.mkdir()
    rules = {"PutObject": {"fraction": 0.25, "errors": ["503", "500", "reset", "timeout", "lost"], "seed": 3}}
    env = {**fault_env(rules, counts_dir=counts), "SDBATCH_MODEL_CACHE": str(tmp_path / "cache")}
    result = run_cli("submit", manifest, "--out", f"s3://{bucket}/runs/f", "--model", model,
                     "--s3-endpoint", endpoint, *FAST, "--workers", "2", env=env)
    assert result.returncode == 0, result.stderr
    faults = faults_injected(counts)
    index = assert_complete(endpoint, bucket, "runs/f", 16)
    print(f"S3 faults injected={faults} rows={len(index)} lost=0 duplicated={len(index) - len({r['id'] for r in index})}")
    assert faults >= 3


def test_outage_longer_than_retry_budget_requeues_shards_and_completes(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    manifest, model = upload_job_inputs(endpoint, bucket, n=12)
    counts = tmp_path / "counts"
    counts.mkdir()
    # every PUT fails for 12 s from shortly after start; botocore gives up after 2 attempts
    rules = {"PutObject": {"errors": ["503"], "outage": {"start": time.time() + 8, "duration": 12}}}
    env = {**fault_env(rules, counts_dir=counts), "SDBATCH_MODEL_CACHE": str(tmp_path / "cache")}
    result = run_cli("submit", manifest, "--out", f"s3://{bucket}/runs/o", "--model", model,
                     "--s3-endpoint", endpoint, *FAST, "--workers", "1",
                     "--set", "retries.storage_attempts=2", "--set", "retries.shard_attempts=20", env=env)
    assert result.returncode == 0, result.stderr
    assert_complete(endpoint, bucket, "runs/o", 12)
    faults = faults_injected(counts)
    print(f"S3 outage faults injected={faults}; shard retries logged={result.stderr.count('failed (attempt')}")
    assert faults >= 1
    progress = json.loads(
        client(endpoint).get_object(Bucket=bucket, Key="runs/o/_sdbatch/progress.json")["Body"].read()
    )
    assert progress["state"] == "finished"
