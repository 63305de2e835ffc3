"""Operations end to end on a long-lived Ray cluster, as an operator runs sdbatch overnight.

One module-scoped run: a head started with ``ray start --head`` on 127.0.0.1 (dashboard and
Jobs API on 127.0.0.1, token auth on, its own temp dir and token so no other Ray on this
machine sees it), a manifest and OUT on a real S3 server (moto). Job 1 is submitted with
``ray job submit`` and held at shard 00002 (test chaos); while it runs, the node's Prometheus
endpoint is scraped for sdbatch's metrics; then ``ray job stop`` stops it and job 2, the same
command resubmitted, resumes and finishes. The assertions: every row exactly once, metrics
with the values the held job must have, the services on loopback only, and ``report.html``
rendered by headless Chromium matching ``_SUCCESS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chaos import chaos_env
from conftest import REPO, small_rows
from faults import fault_env, sdbatch_command
from PIL import Image

pytestmark = pytest.mark.slow

ROWS = small_rows()  # 24 rows
RPS, BATCH = 6, 3  # 4 shards of 2 batches each
HELD = "00002"  # job 1 runs shards 00000 and 00001, then holds here until stopped
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait(what: str, check, timeout: float = 180.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Cluster:
    dashboard: str  # the Jobs API
    metrics: str  # the node's Prometheus endpoint
    env: dict[str, str]  # for `ray job` commands (the token) and the job's processes
    temp_dir: str

    def ray(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=self.env)

    def job_status(self, job_id: str) -> str:
        """What ``ray job status`` says (it logs the status line to stderr)."""
        done = self.ray("job", "status", "--address", self.dashboard, job_id)
        return done.stdout + done.stderr

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        return found


@pytest.fixture(scope="module")
def jobs_cluster(s3_server):
    """A Ray head started as an operator would, bound to 127.0.0.1; its fake AWS credentials
    come from the environment the s3_server fixture set."""
    temp_dir = tempfile.mkdtemp(prefix="sdbr-", dir="/tmp")  # short: Ray's socket paths must fit
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard, metrics, agent, client = _free_ports(5)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        # Ray resolves --node-ip-address=127.0.0.1 to the host's outward address unless cluster
        # networking is off; off, every service advertises and binds loopback (infra/README.md)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_JOB_STOP_WAIT_TIME_S": "60",  # `ray job stop`: SIGTERM, then this long before SIGKILL
        "RAY_raylet_start_wait_time_s": "180",  # a loaded CI machine starts a raylet slowly
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
    })
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    cluster = Cluster(f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{metrics}/metrics", env, temp_dir)
    try:
        _wait("the Ray head to start", lambda: head.poll() is not None or "Ray runtime started" in
              (Path(temp_dir) / "ray-start.log").read_text(), timeout=240)
        assert head.poll() is None, (Path(temp_dir) / "ray-start.log").read_text()[-3000:]
        yield cluster
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        for proc in cluster.processes():  # workers live in their own sessions
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class JobsRun:
    out: str
    bucket: str
    client: object
    job1_status: str
    job1_logs: str
    committed_after_stop: list[str]
    progress_after_stop: dict
    lock_after_stop: bool
    metrics: dict[str, list[tuple[dict, float]]]
    listening: list[tuple[str, str, int]]  # (process name, address, port)
    job2: subprocess.CompletedProcess

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"run/{key}")["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"run/{prefix}")
        return [o["Key"][len("run/"):] for page in pages for o in page.get("Contents", [])]


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_sdbatch_"):
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(metrics: dict, name: str, out: str) -> float:
    return sum(value for labels, value in metrics.get(name, []) if labels.get("out") == out)


@pytest.fixture(scope="module")
def jobs_run(jobs_cluster, s3_bucket_module, tmp_path_factory):
    endpoint, bucket = s3_bucket_module
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS), sink)
    client.put_object(Bucket=bucket, Key="manifests/night.parquet", Body=sink.getvalue().to_pybytes())
    out = f"s3://{bucket}/run"
    command = ["sdbatch", "submit", f"s3://{bucket}/manifests/night.parquet", "--out", out, "--s3-endpoint", endpoint,
               "--workers", "1", "--rows-per-shard", str(RPS), "--batch-size", str(BATCH), "--steps", "2"]
    markers = tmp_path_factory.mktemp("chaos")
    # job 1 holds at shard HELD, and each process's first two PutObjects answer 503 (botocore
    # retries them; a metric counts it): tests/faulty_sdbatch.py installs both in its driver
    # and, through Ray's worker_process_setup_hook, in its workers
    faulty = {**chaos_env(markers, hold_shards=[HELD]), **fault_env({"PutObject": {"errors": ["503"], "first": 2}})}
    run = JobsRun(out, bucket, client, "", "", [], {}, True, {}, [], None)  # type: ignore[arg-type]

    # (on the entrypoint's command line: a job-level runtime_env would clash with the one
    # faulty_sdbatch.py gives ray.init)
    submitted = jobs_cluster.ray("job", "submit", "--address", jobs_cluster.dashboard, "--no-wait",
                                 "--submission-id", "sdbatch-night-1", "--",
                                 "env", *(f"{k}={v}" for k, v in faulty.items()), *sdbatch_command(faulty), *command[1:])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    def job1_logs() -> str:
        return jobs_cluster.ray("job", "logs", "--address", jobs_cluster.dashboard, "sdbatch-night-1").stdout

    def held() -> bool:
        status = jobs_cluster.job_status("sdbatch-night-1")
        assert "failed" not in status.lower() and "succeeded" not in status.lower(), job1_logs()
        return any(markers.glob(f"hold-{HELD}-*")) and len(run.keys("metadata/")) == 2

    _wait("job 1 to commit shards 00000-00001 and hold 00002", held, timeout=400, every=2)

    def metrics_settled() -> dict | None:
        """Every process reports on its own cycle: wait for the driver's and the worker's."""
        samples = scrape(jobs_cluster.metrics)
        wanted = total(samples, "ray_sdbatch_rows_done", out) == 2 * RPS and \
            total(samples, "ray_sdbatch_shard_seconds_count", out) == 2 and \
            total(samples, "ray_sdbatch_batch_seconds_count", out) == 2 * RPS // BATCH
        return samples if wanted else None

    run.metrics = _wait("sdbatch metrics on the node's Prometheus endpoint", metrics_settled, timeout=120, every=3)
    run.listening = [(p.name(), c.laddr.ip, c.laddr.port) for p in jobs_cluster.processes()
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

    stopped = jobs_cluster.ray("job", "stop", "--address", jobs_cluster.dashboard, "sdbatch-night-1")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    run.job1_status = jobs_cluster.job_status("sdbatch-night-1")
    run.job1_logs = job1_logs()
    run.committed_after_stop = sorted(run.keys("metadata/"))
    run.progress_after_stop = json.loads(run.get("_sdbatch/progress.json"))
    run.lock_after_stop = bool(run.keys("_sdbatch/lock.json"))

    run.job2 = jobs_cluster.ray("job", "submit", "--address", jobs_cluster.dashboard,
                                "--submission-id", "sdbatch-night-2", "--", *command)
    return run


@pytest.fixture(scope="module")
def s3_bucket_module(s3_server):
    import uuid

    bucket = f"sdbatch-ops-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return s3_server, bucket


def test_ray_job_stop_then_resubmit_generates_every_row_once(jobs_run):
    assert "Job 'sdbatch-night-1' was stopped" in jobs_run.job1_status, jobs_run.job1_status
    assert jobs_run.committed_after_stop == ["metadata/00000.parquet", "metadata/00001.parquet"]
    # SIGTERM from `ray job stop` stopped the driver as Ctrl-C does: progress closed, lock released
    assert jobs_run.progress_after_stop["state"] == "interrupted"
    assert "interrupted; committed shards are kept" in " ".join(jobs_run.job1_logs.split()), jobs_run.job1_logs[-3000:]
    assert not jobs_run.lock_after_stop
    assert jobs_run.job2.returncode == 0, jobs_run.job2.stdout[-4000:] + jobs_run.job2.stderr[-2000:]
    assert "12 images generated this run (0 rows failed, 2 shards already committed)" in jobs_run.job2.stdout
    index = pq.read_table(pa.BufferReader(jobs_run.get("index.parquet"))).to_pylist()
    assert [r["id"] for r in index] == [r["id"] for r in ROWS]  # every row once, in manifest order
    assert {r["status"] for r in index} == {"ok"}
    for r in index:
        assert hashlib.sha256(jobs_run.get(r["key"])).hexdigest() == r["sha256"], r["id"]
    assert sorted(jobs_run.keys("images/")) == sorted(r["key"] for r in index)  # nothing extra written
    success = json.loads(jobs_run.get("_SUCCESS"))
    assert (success["rows_ok"], success["rows_failed"], success["rows_generated_this_run"]) == (24, 0, 12)


def test_metrics_scraped_from_the_node_during_the_job(jobs_run):
    m, out = jobs_run.metrics, jobs_run.out
    # job 1 held at shard 00002: shards 00000-00001 (12 rows, 4 batches of 3) done, nothing failed
    assert total(m, "ray_sdbatch_rows_done", out) == 12
    assert total(m, "ray_sdbatch_rows_remaining", out) == 12
    assert total(m, "ray_sdbatch_rows_failed", out) == 0
    assert total(m, "ray_sdbatch_workers", out) == 1
    assert total(m, "ray_sdbatch_worker_restarts", out) == 0
    assert 0 < total(m, "ray_sdbatch_images_per_second", out) < 1000
    assert total(m, "ray_sdbatch_images_generated_total", out) == 12
    assert total(m, "ray_sdbatch_batch_seconds_count", out) == 4
    assert total(m, "ray_sdbatch_shard_seconds_count", out) == 2
    # (Ray approximates a histogram's _sum from bucket midpoints: the buckets are what is exact)
    batches_within_300s = sum(v for labels, v in m["ray_sdbatch_batch_seconds_bucket"]
                              if labels.get("out") == out and labels["le"] == "300.0")
    assert batches_within_300s == 4 and total(m, "ray_sdbatch_batch_seconds_sum", out) > 0
    # the first two PutObjects of the driver and of the worker answered 503 and were retried
    assert 2 <= total(m, "ray_sdbatch_storage_retries_total", out) <= 4


def test_cluster_services_listen_on_loopback_only(jobs_run):
    assert jobs_run.listening, "no listening socket found for the cluster's processes"
    exposed = [(name, ip, port) for name, ip, port in jobs_run.listening
               if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, exposed


@pytest.fixture(scope="module")
def chromium():
    """Debian's headless Chromium, installed on first use (the tests run as root)."""
    path = shutil.which("chromium")
    if path is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=900)
            assert done.returncode == 0, f"{' '.join(step)} failed: {done.stderr[-2000:]}"
        path = shutil.which("chromium")
    assert path, "chromium is not installed"
    return path


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", *args],
        capture_output=True, text=True, timeout=180,
    )


def test_report_renders_in_chromium_and_matches_success(jobs_run, s3_bucket_module, chromium, tmp_path):
    written_by_job = jobs_run.get("report.html")  # by job 2's driver, at the end
    endpoint, _ = s3_bucket_module
    rewritten = subprocess.run([sys.executable, "-m", "sdbatch", "report", jobs_run.out, "--s3-endpoint", endpoint],
                               capture_output=True, text=True, timeout=300, cwd=REPO)
    assert rewritten.returncode == 0, rewritten.stderr
    assert rewritten.stdout.strip() == f"report → {jobs_run.out}/report.html"
    page = tmp_path / "report.html"
    page.write_bytes(jobs_run.get("report.html"))
    assert len(page.read_bytes()) == pytest.approx(len(written_by_job), rel=0.01)  # the same page, regenerated
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org/", "") and "https://" not in html  # self-contained

    shot = tmp_path / "shot.png"
    run_chromium(chromium, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri())
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    background = max(colours)[0]
    assert background < 0.95 * image.width * image.height  # a page, not a white sheet

    dom = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri()).stdout
    shown = dict(re.findall(r'<td class="num" id="([a-z0-9-]+)">([^<]*)</td>', dom))
    success = json.loads(jobs_run.get("_SUCCESS"))
    assert shown["rows-total"] == str(success["rows_total"])
    assert shown["rows-ok"] == str(success["rows_ok"])
    assert shown["rows-failed"] == str(success["rows_failed"])
    assert shown["rows-skipped"] == "0"
    assert shown["images-this-run"] == str(success["rows_generated_this_run"])
    assert shown["wall-seconds"] == f"{success['wall_seconds_this_run']:.2f} s"
    assert shown["images-per-second"] == f"{success['images_per_second_this_run']:.3f}"
    assert 'id="throughput-chart"' in dom
    thumbnails = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="(r\d\d)"', dom)
    assert thumbnails == [r["id"] for r in ROWS]  # 24 ≤ contact_sheet_images: every image, in order
