"""`sdbatch submit` end to end: the CLI as a subprocess, a real local Ray cluster, the real
diffusers pipeline on a built-in model, local output."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import image_hashes, load_index, sdbatch_cli, small_rows, write_manifest
from PIL import Image

from sdbatch.output.encode import parse_infotext, read_embedded

FAST = ["--model", "builtin:tiny", "--steps", "4", "--rows-per-shard", "6", "--batch-size", "4", "--guidance-scale", "6.5"]


@pytest.fixture(scope="module")
def two_workers(ray_address, tmp_path_factory):
    """The 24 small rows on two workers: the job the first test checks row by row and the
    next compares with one worker's (a job is mostly its processes starting: one for both)."""
    tmp = tmp_path_factory.mktemp("two-workers")
    manifest, out = write_manifest(tmp / "manifest.parquet", small_rows()), tmp / "out"
    return manifest, out, sdbatch_cli(ray_address, "submit", manifest, "--out", out, *FAST, "--workers", "2")


def test_submit_writes_every_row_once_with_metadata(run_cli, two_workers):
    small_manifest, out, result = two_workers
    assert result.returncode == 0, result.stderr
    assert (out / "_SUCCESS").is_file()
    # the summary is one line, never wrapped at 80 columns off a terminal
    summary = [line for line in result.stdout.splitlines() if "images generated this run" in line]
    assert len(summary) == 1 and summary[0].endswith(f"full → {out.resolve().as_uri()}"), result.stdout
    manifest = pq.read_table(small_manifest).to_pylist()
    index = load_index(out)
    assert [r["id"] for r in index] == [m["id"] for m in manifest]  # one to one, in manifest order
    assert sorted(os.listdir(out / "metadata")) == [f"{i:05d}.parquet" for i in range(4)]
    for m, r in zip(manifest, index):
        assert (r["prompt"], r["seed"], r["label"], r["status"]) == (m["prompt"], m["seed"], m["label"], "ok")
        data = (out / r["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        image = Image.open(io.BytesIO(data))
        assert image.size == (64, 64) and image.format == "PNG"
        image.load()
        text, record = read_embedded(data)
        params = parse_infotext(text)
        assert params["prompt"] == m["prompt"]
        assert params["negative_prompt"] == m["negative_prompt"]
        assert (params["steps"], params["scheduler"], params["guidance_scale"]) == (4, "ddim", 6.5)
        assert (params["seed"], params["width"], params["height"]) == (m["seed"], 64, 64)
        assert record["id"] == m["id"] and record["batch_id"] == r["batch_id"]
        assert record["extra"] == {"label": m["label"]}
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_in_index"] == success["rows_ok"] == 24

    status = run_cli("status", out)
    assert status.returncode == 0, status.stderr
    assert "4/4 committed" in status.stdout and "finished" in status.stdout

    again = run_cli("submit", small_manifest, "--out", out, *FAST, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert "nothing to generate" in again.stdout
    assert load_index(out) == index


def test_same_manifest_gives_same_bytes_with_other_worker_counts(run_cli, two_workers, tmp_path):
    small_manifest, two_out, two = two_workers
    assert two.returncode == 0, two.stderr
    out = tmp_path / "w1"
    result = run_cli("submit", small_manifest, "--out", out, *FAST, "--workers", "1")
    assert result.returncode == 0, result.stderr
    runs = {"1": image_hashes(out), "2": image_hashes(two_out)}
    assert len(runs["1"]) == 24
    assert runs["1"] == runs["2"]
    assert len(set(runs["1"].values())) == 24  # different seeds and prompts, different images


def test_fewer_shards_than_workers_starts_one_worker_per_shard_and_says_how_to_spread_them(run_cli, tmp_path):
    from conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": f"a red square {i}", "seed": i} for i in range(3)])
    out = tmp_path / "out"
    result = run_cli("submit", manifest, "--out", out, "--model", "builtin:tiny", "--steps", "2", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "1 shard to generate for 2 workers: starting 1; shards hold 64 rows each" in result.stderr
    assert "start the job with --rows-per-shard 2" in result.stderr
    assert sorted(os.listdir(out / "metadata")) == ["00000.parquet"]  # shards are not sized by --workers
    assert [r["status"] for r in load_index(out)] == ["ok"] * 3


def test_driver_killed_mid_job_resumes_without_redoing_committed_shards(ray_address, tmp_path):
    from conftest import write_manifest

    manifest = write_manifest(
        tmp_path / "m.parquet",
        [{"id": f"k{i:03d}", "prompt": f"a red square number {i}", "seed": i} for i in range(60)],
    )
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdbatch", "submit", str(manifest), "--out", str(out),
            "--model", "builtin:tiny", "--steps", "6", "--rows-per-shard", "5", "--batch-size", "5", "--workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "metadata").glob("*.parquet"))) < 2:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    running = subprocess.run([sys.executable, "-m", "sdbatch", "status", str(out)], capture_output=True, text=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert running.returncode == 0, running.stderr
    assert f"pid {driver.pid}, last heartbeat" in running.stdout and "gone" not in running.stdout
    killed = subprocess.run([sys.executable, "-m", "sdbatch", "status", str(out)], capture_output=True, text=True)
    said = " ".join(killed.stdout.split())
    assert "state interrupted (no driver is running it; run the same command to resume)" in said, killed.stdout
    assert f"driver gone (host {socket.gethostname()}, pid {driver.pid}" in said
    committed = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "metadata").glob("*.parquet")}
    assert 2 <= len(committed) < 12, "the driver must be killed mid-job"
    assert not (out / "_SUCCESS").exists()

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    for name, (mtime, data) in committed.items():  # committed shards untouched
        path = out / "metadata" / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data
    index = load_index(out)
    assert sorted(r["id"] for r in index) == [f"k{i:03d}" for i in range(60)]
    assert len({r["id"] for r in index}) == 60
    assert f"{len(committed)} shards already committed" in rerun.stdout.replace("\n", " ")
    for r in index:
        assert hashlib.sha256((out / r["key"]).read_bytes()).hexdigest() == r["sha256"]


def test_unknown_model_is_refused_before_anything_is_written(run_cli, small_manifest, tmp_path):
    out = tmp_path / "out"
    result = run_cli("submit", small_manifest, "--out", out, "--model", "builtin:nope")
    assert result.returncode == 2
    assert "unknown built-in model 'builtin:nope'" in result.stderr
    assert not out.exists()


def test_help_and_status_do_not_import_torch():
    code = "import sys, sdbatch.cli, sdbatch.run.driver; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_help_shows_boolean_options_as_plain_flags():
    import re

    import typer.main
    from typer.testing import CliRunner

    from sdbatch.cli.app import app

    runner = CliRunner()
    commands = sorted(typer.main.get_command(app).commands)
    assert {"submit", "validate", "status", "verify", "unlock"} <= set(commands)
    for args in ([], *([name] for name in commands)):
        result = runner.invoke(app, [*args, "--help"], terminal_width=200, env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        assert "<bool>" not in result.output and "BOOLEAN" not in result.output, (args, result.output)
    submit = runner.invoke(app, ["submit", "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
    for flag, help_text in (("--strict", "Refuse columns"), ("--dry-run", "Validate, preflight"),
                            ("--retry-failed", "Also regenerate rows"), ("--help", "Show this message")):
        assert re.search(rf"{flag}\s+(-\w\s+)?{help_text}", submit), (flag, submit)  # the flag, then its help
    assert re.search(r"--steps\s+<int>", submit)  # options that take a value keep their type
