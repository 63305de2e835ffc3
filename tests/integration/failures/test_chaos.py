"""Chaos suite: whatever dies, the final index holds every manifest row exactly once, every
stored image matches its recorded sha256, and no committed shard is regenerated.

Each case prints its figures: faults injected, rows lost, rows duplicated, committed shards
regenerated (all but the first must be 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_manifest

from integration import chaos
from integration.faults import sdbatch_command

FAST = ["--model", "builtin:tiny", "--steps", "3", "--rows-per-shard", "4", "--batch-size", "2"]


def chaos_manifest(tmp_path: Path, n: int = 24, **extra) -> Path:
    rows = [{"id": f"c{i:03d}", "prompt": f"a blue triangle number {i}", "seed": i, **extra} for i in range(n)]
    return write_manifest(tmp_path / "manifest.parquet", rows)


def figures(case: str, out: Path, manifest: Path, faults: int, metadata_before: dict | None = None) -> dict:
    """Check the output against the manifest and print the case's figures."""
    expected = [r["id"] for r in pq.read_table(manifest).to_pylist()]
    index = pq.read_table(out / "index.parquet").to_pylist()
    ids = [r["id"] for r in index]
    for r in index:
        if r["status"] == "ok":
            assert hashlib.sha256((out / r["key"]).read_bytes()).hexdigest() == r["sha256"], r["id"]
    regenerated = sum(
        1 for name, data in (metadata_before or {}).items() if (out / "metadata" / name).read_bytes() != data
    )
    result = {
        "faults": faults,
        "lost": len(set(expected) - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "regenerated_committed": regenerated,
    }
    print(f"CHAOS {case}: " + " ".join(f"{k}={v}" for k, v in result.items()))
    assert set(ids) <= set(expected)
    assert result["lost"] == result["duplicated"] == result["regenerated_committed"] == 0
    return result


def snapshot_metadata(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "metadata").glob("*.parquet")}


def markers(folder: Path, kind: str) -> int:
    return sum(1 for p in folder.iterdir() if p.name.startswith(kind + "-"))


def chaos_env(tmp_path: Path, **config) -> dict[str, str]:
    marker_dir = tmp_path / "faults"
    marker_dir.mkdir(exist_ok=True)
    return chaos.chaos_env(marker_dir, **config)


@pytest.mark.slow
def test_workers_killed_on_a_tenth_of_batches(run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 16)  # 4 shards of 2 batches
    out = tmp_path / "out"
    # seed 55 draws 3 kills on these shards: 00000 on its first two attempts (a retry dies too)
    # and 00001 on its first; each costs a worker restart, which is what the test pays for
    env = chaos_env(tmp_path, kill_fraction=0.12, seed=55)
    result = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "2",
                     "--set", "retries.shard_attempts=8", env=env)
    assert result.returncode == 0, result.stderr
    kills = markers(tmp_path / "faults", "kill")
    assert kills >= 1, "the chaos hook must have killed some workers"
    assert "worker died" in result.stderr
    figures("workers-killed", out, manifest, kills)


HANG_TIMEOUT_S = 20


def test_hung_worker_is_replaced(run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 12)
    out = tmp_path / "out"
    env = chaos_env(tmp_path, hang_shards=["00001"])  # its first attempt sleeps an hour
    # a healthy shard must never look hung: on a loaded machine a fresh worker's first batch has
    # taken over 6 s (the replacement was replaced too: attempt 3); this is room for that
    result = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "2",
                     "--set", f"retries.hang_timeout_s={HANG_TIMEOUT_S}", env=env)
    assert result.returncode == 0, result.stderr
    assert "shard 00001 made no progress" in result.stderr
    assert markers(tmp_path / "faults", "hang") == 1
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["attempt"] for r in index if r["shard"] == "00001"} == {2}
    figures("hung-worker", out, manifest, 1)


def test_a_worker_hung_loading_the_model_is_replaced(run_cli, tmp_path):
    """Issue 21 finding 9: a worker stopped while it loads the model (SIGSTOP: ready() never
    answers, no shard ever starts) is replaced after retries.load_timeout_s, not waited on forever."""
    manifest = chaos_manifest(tmp_path, 4)
    out = tmp_path / "out"
    env = chaos_env(tmp_path, hang_loads=1)
    result = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "1",
                     "--set", "retries.load_timeout_s=20", env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "a worker has been loading the model for" in result.stderr
    assert "(retries.load_timeout_s=20): replacing it" in result.stderr
    assert markers(tmp_path / "faults", "hangload") == 1
    figures("hung-model-load", out, manifest, 1)


def test_a_local_ray_node_that_times_out_at_start_up_is_a_documented_error(tmp_path):
    """Issue 21 finding 17: Ray's own "timed out during startup" (the node never registers)
    exits 5 with the fix and the resume hint, not a traceback and exit 1."""
    from conftest import RAY_SINGLE_MACHINE, REPO

    manifest = chaos_manifest(tmp_path, 2)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RAY_SINGLE_MACHINE)}  # a local cluster
    env.update(chaos_env(tmp_path, ray_node_start_timeout=True), RAY_AUTH_MODE="token")
    result = subprocess.run([*sdbatch_command(env), "submit", manifest, "--out", tmp_path / "out", *FAST],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert markers(tmp_path / "faults", "raystart") == 1
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stderr
    said = " ".join(result.stderr.split())
    assert ("error: could not start a local Ray cluster: Exception: The current node timed out during startup." in said)
    assert "Fix: make sure the machine has free memory, CPU and space in /tmp" in said
    assert "run the same command again to go on" in said


def test_shard_that_always_fails_is_reported_and_others_finish(run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 12)
    out = tmp_path / "out"
    env = chaos_env(tmp_path, fail_shards=["00002"])
    result = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "2",
                     "--set", "retries.shard_attempts=2", env=env)
    assert result.returncode == 5, result.stderr
    assert "shards 00002 failed on every attempt" in result.stderr
    assert "injected failure of shard 00002" in result.stderr
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["00000.parquet", "00001.parquet"]
    assert markers(tmp_path / "faults", "fail") == 2
    assert not (out / "_SUCCESS").exists()
    before = snapshot_metadata(out)
    rerun = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    figures("always-failing-shard", out, manifest, 2, before)


def test_broken_init_images_fail_rows_then_retry_failed_regenerates_only_them(run_cli, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "good.png")
    rows = [
        {"id": f"i{i:02d}", "prompt": "a red circle", "seed": i,
         "init_image": "good.png" if i % 3 else f"missing-{i}.png", "strength": 0.6}
        for i in range(9)
    ]
    manifest = write_manifest(tmp_path / "manifest.parquet", rows)
    out = tmp_path / "out"
    first = run_cli("submit", manifest, "--out", out, *FAST)
    assert first.returncode == 3, first.stderr
    assert "3 rows failed permanently" in first.stderr
    index = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    failed = sorted(i for i, r in index.items() if r["status"] == "failed")
    assert failed == ["i00", "i03", "i06"]
    assert "missing-0.png" in index["i00"]["error"]
    ok_before = {i: r["sha256"] for i, r in index.items() if r["status"] == "ok"}

    for i in (0, 3, 6):  # the user fixes the inputs
        Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / f"missing-{i}.png")
    retry = run_cli("submit", manifest, "--out", out, *FAST, "--retry-failed")
    assert retry.returncode == 0, retry.stderr
    after = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert all(r["status"] == "ok" for r in after.values()) and len(after) == 9
    assert {i: after[i]["sha256"] for i in ok_before} == ok_before  # untouched
    assert json.loads((out / "_SUCCESS").read_text())["rows_failed"] == 0
    figures("retry-failed", out, manifest, 3)


def test_deadline_stops_and_a_rerun_completes(run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 40)
    out = tmp_path / "out"
    stopped = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "1", "--deadline", "1s")
    assert stopped.returncode == 4, stopped.stderr
    assert "deadline" in stopped.stderr
    committed = snapshot_metadata(out)
    assert len(committed) < 10 and not (out / "_SUCCESS").exists()
    rerun = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "2")
    assert rerun.returncode == 0, rerun.stderr
    figures("deadline", out, manifest, 0, committed)


def _driver(ray_address: str, manifest: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = [*sdbatch_command(env), "submit", str(manifest), "--out", str(out), *FAST, *extra]
    return subprocess.Popen(args, env={**os.environ, "RAY_ADDRESS": ray_address, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.1)


def test_driver_killed_before_first_commit_then_rerun(ray_address, run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 16)
    out = tmp_path / "out"
    driver = _driver(ray_address, manifest, out, "--workers", "1")
    _wait_for(lambda: (out / "_sdbatch" / "lock.json").exists(), driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not list((out / "metadata").glob("*")) if (out / "metadata").exists() else True
    rerun = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    figures("driver-killed-before-commit", out, manifest, 1)


def test_driver_killed_during_final_merge_then_rerun(run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 8)
    out = tmp_path / "out"
    died = run_cli("submit", manifest, "--out", out, *FAST, env=chaos_env(tmp_path, driver_exit_at="merge"))
    assert died.returncode == 137
    assert (out / "index.parquet").read_bytes() == b"PAR1-truncated-by-test"
    before = snapshot_metadata(out)
    assert len(before) == 2 and not (out / "_SUCCESS").exists()
    rerun = run_cli("submit", manifest, "--out", out, *FAST)
    assert rerun.returncode == 0, rerun.stderr
    assert "nothing to generate" in rerun.stdout
    figures("driver-killed-in-merge", out, manifest, 1, before)


def test_second_driver_on_the_same_out_is_refused(ray_address, run_cli, tmp_path):
    manifest = chaos_manifest(tmp_path, 24)
    out = tmp_path / "out"
    first = _driver(ray_address, manifest, out, "--workers", "1")
    _wait_for(lambda: (out / "_sdbatch" / "lock.json").exists(), first)
    second = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "1")
    assert second.returncode == 2
    assert "is being written by another sdbatch driver" in second.stderr
    assert first.wait(timeout=600) == 0, first.communicate()
    assert not (out / "_sdbatch" / "lock.json").exists()
    figures("two-drivers", out, manifest, 1)


DEADLINE_AFTER_READY_S = 10  # room for the driver to hand out and the worker to start 00000, its model loaded


def test_deadline_does_not_start_shards_already_handed_to_a_worker(ray_address, run_cli, tmp_path):
    """One worker is handed two shards at a time; the deadline passes while it runs the first.
    That one finishes and commits; the second, waiting on the worker, is not started, nor are
    the two still in the driver's queue. A rerun does exactly the three left.

    The test chaos moves the deadline to DEADLINE_AFTER_READY_S after the worker has loaded its
    model (before the first shard is handed out): however slowly the model loads on a busy
    machine, 00000 starts before the deadline and the deadline passes while it is held."""
    manifest = chaos_manifest(tmp_path, 16)  # 4 shards of 4 rows
    out = tmp_path / "out"
    faults = tmp_path / "faults"
    driver = _driver(ray_address, manifest, out, "--workers", "1", "--deadline", "1h",
                     env=chaos_env(tmp_path, hold_shards=["00000"], deadline_after_ready_s=DEADLINE_AFTER_READY_S))
    _wait_for(lambda: markers(faults, "hold") == 1, driver)  # 00000 started before the deadline, held
    deadline_at = float((faults / "deadline_at").read_text())  # written before 00000 was handed out
    while time.time() <= deadline_at + 0.5:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.2)
    (faults / "release").touch()
    _, stderr = driver.communicate(timeout=600)
    said = " ".join(stderr.split())
    assert driver.returncode == 4, stderr
    assert "2 queued shards left for a rerun" in said  # 00002, 00003: never handed out
    assert "stopped at the deadline with 3 shards left" in said  # + 00001, deferred by the worker

    committed = snapshot_metadata(out)
    assert sorted(committed) == ["00000.parquet"]
    shard0 = pq.read_table(out / "metadata" / "00000.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in shard0] == [(f"c{i:03d}", "ok") for i in range(4)]
    stored = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                    if p.is_file() and p.parts[-2] != "_sdbatch" and p.name != "report.html")  # the run's report
    assert stored == sorted(["metadata/00000.parquet", *(r["key"] for r in shard0)])  # nothing of 00001-00003
    assert not (out / "_SUCCESS").exists() and markers(faults, "hold") == 1

    rerun = run_cli("submit", manifest, "--out", out, *FAST, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 shard already committed" in " ".join(rerun.stdout.split())
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["id"] for r in index] == [r["id"] for r in pq.read_table(manifest).to_pylist()]
    assert {r["shard"] for r in index if r["attempt"] == 1} == {"00000", "00001", "00002", "00003"}
    figures("deadline-handed-out", out, manifest, 1, committed)


def test_worker_returns_a_shard_reaching_it_after_the_deadline_unstarted(ray_address, tmp_path):
    """Both call paths (a new shard, --retry-failed rows of a committed one): nothing generated,
    written or reported to the progress tracker, so the watchdog cannot take it for hung."""
    import ray

    from sdbatch.manifest.sources import open_manifest
    from sdbatch.run.driver import ProgressTracker
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.worker import WorkerActor
    from sdbatch.spec import load_spec

    manifest = open_manifest(str(chaos_manifest(tmp_path, 4)))
    spec = load_spec(overrides={"model.name": "builtin:tiny", "defaults.steps": 3})
    out = tmp_path / "out"
    out.mkdir()
    tracker = ProgressTracker.remote()
    from sdbatch.models.resolve import preflight

    actor = WorkerActor.remote(spec.model_dump_json(), str(out), None, tracker, manifest, "job-fingerprint",
                               preflight("builtin:tiny").pin)
    try:
        work = ShardSpec(0, range(4))
        for turn, retry_ids in enumerate((None, frozenset({"c001"}))):
            actor.prefetch.remote(work, retry_ids)  # read ahead, then dropped: it does not start
            result = ray.get(actor.run_shard.remote(work, turn, 1, retry_ids, not_after=time.time() - 1))
            assert result.deferred and not result.committed
            assert (result.rows_ok, result.rows_failed, result.images_created) == (0, 0, 0)
        assert list(out.iterdir()) == []
        assert ray.get(tracker.snapshot.remote())[:3] == ({}, 0.0, {})
    finally:
        ray.kill(actor)
        ray.kill(tracker)


@pytest.mark.slow
def test_node_removed_mid_job(tmp_path, s3_server):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        manifest = chaos_manifest(tmp_path, 40)
        out = tmp_path / "out"
        driver = _driver(cluster.address, manifest, out, "--workers", "2", "--set", "retries.shard_attempts=5")
        _wait_for(lambda: len(list((out / "metadata").glob("*.parquet"))) >= 2, driver)
        before = snapshot_metadata(out)
        cluster.remove_node(nodes[0])
        cluster.add_node(num_cpus=1)
        stdout, stderr = driver.communicate(timeout=600)
        assert driver.returncode == 0, stderr
        assert "worker died" in stderr  # the removed node took a worker with it
        figures("node-removed", out, manifest, 1, before)
    finally:
        cluster.shutdown()


def test_driver_whose_lock_was_taken_over_stops(ray_address, tmp_path):
    """A driver whose lease another driver took over (its heartbeats had failed) notices at
    its next heartbeat, stops with exit 2 and a message naming the new owner, and leaves the
    new owner's lock alone. What it had committed is kept."""
    manifest = chaos_manifest(tmp_path, 8)
    out = tmp_path / "out"
    faults = tmp_path / "faults"
    driver = _driver(ray_address, manifest, out, "--workers", "1", env=chaos_env(tmp_path, hold_shards=["00000"]))
    _wait_for(lambda: markers(faults, "hold") == 1, driver)
    usurper = {"driver": "f" * 32, "host": "other-host", "pid": 4242, "heartbeat_at": time.time(),
               "expires_at": time.time() + 3600}
    (out / "_sdbatch" / "lock.json").write_text(json.dumps(usurper))
    _, stderr = driver.communicate(timeout=120)  # the heartbeat comes every 10 s
    (faults / "release").touch()
    said = " ".join(stderr.split())
    assert driver.returncode == 2, stderr
    assert "another sdbatch driver (host other-host, pid 4242) took over the job lock" in said
    assert json.loads((out / "_sdbatch" / "lock.json").read_text()) == usurper
    assert not (out / "index.parquet").exists() and not (out / "_SUCCESS").exists()


def test_sigterm_interrupts_the_driver_like_ctrl_c(ray_address, tmp_path):
    """SIGTERM (a scheduler's or systemd's stop) ends a driver as Ctrl-C does: exit 130, the
    resume hint, the lock released, progress.json saying interrupted — no traceback."""
    manifest = chaos_manifest(tmp_path, 8)
    out = tmp_path / "out"
    faults = tmp_path / "faults"
    driver = _driver(ray_address, manifest, out, "--workers", "1", env=chaos_env(tmp_path, hold_shards=["00000"]))
    _wait_for(lambda: markers(faults, "hold") == 1, driver)
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=120)
    (faults / "release").touch()
    assert driver.returncode == 130, stderr
    assert "error: interrupted; committed shards are kept" in stderr and "Traceback" not in stderr
    assert not (out / "_sdbatch" / "lock.json").exists()
    assert json.loads((out / "_sdbatch" / "progress.json").read_text())["state"] == "interrupted"


# ---------------------------------------------------------------------------------------------
# one job, three runs: the tracker actor dies; a deterministic shard error; the resume


@pytest.fixture(scope="module")
def tracker_then_broken_shard(ray_address, tmp_path_factory):
    from conftest import sdbatch_cli

    tmp = tmp_path_factory.mktemp("tracker-broken")
    manifest = chaos_manifest(tmp, 16)  # 4 shards of 4 rows
    out = tmp / "out"
    args = ["submit", manifest, "--out", out, *FAST, "--workers", "1"]
    runs = {}
    # shard 00002 is held: the worker cannot commit the rest before the driver sees the tracker gone
    for name, env in (("tracker", chaos_env(tmp, kill_tracker_after_commits=1, hold_shards=["00002"])),
                      ("broken", chaos_env(tmp, broken_shards=["00003"])), ("resume", None)):
        run = sdbatch_cli(ray_address, *args, env=env)
        progress = json.loads((out / "_sdbatch" / "progress.json").read_text())
        status = sdbatch_cli(ray_address, "status", out) if name == "broken" else None
        runs[name] = (run, progress, status, snapshot_metadata(out))
    return manifest, out, tmp / "faults", runs


def test_a_dead_progress_tracker_stops_the_job_with_the_resume_hint(tracker_then_broken_shard):
    _, out, faults, runs = tracker_then_broken_shard
    run, progress, _, committed = runs["tracker"]
    said = " ".join(run.stderr.split())
    assert run.returncode == 5, run.stderr
    assert markers(faults, "tracker") == 1 and "Traceback" not in run.stderr
    assert "error: the Ray cluster failed under the driver (" in said
    assert "committed shards are kept — run the same command again to go on" in said
    assert progress["state"] == "failed" and 1 <= len(committed) < 4
    assert runs["broken"][0].returncode != 2  # the lock was released: the next run was not refused


def test_a_deterministic_shard_error_is_attempted_once_and_the_other_shards_commit(tracker_then_broken_shard):
    _, out, faults, runs = tracker_then_broken_shard
    committed = runs["tracker"][3]
    run, progress, status, after = runs["broken"]
    said = " ".join(run.stderr.split())
    assert run.returncode == 5, run.stderr
    assert markers(faults, "broken") == 1  # retries.shard_attempts is 3: a deterministic error gets one
    assert "shards 00003 failed on every attempt" in said
    assert "00003 after 1 attempt: RuntimeError: injected deterministic failure of shard 00003" in said
    assert sorted(after) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert {name: after[name] for name in committed} == committed  # the first run's commits untouched
    assert progress["state"] == "incomplete" and progress["failed_shards"] == [
        {"shard": "00003", "attempts": 1, "error": "RuntimeError: injected deterministic failure of shard 00003"}]
    assert status.returncode == 0, status.stderr
    assert "failed     shard 00003 after 1 attempt: RuntimeError: injected deterministic failure" in status.stdout


def test_the_resume_after_both_completes_every_row_once(tracker_then_broken_shard):
    manifest, out, _, runs = tracker_then_broken_shard
    resumed, after = runs["resume"][0], runs["broken"][3]
    assert resumed.returncode == 0, resumed.stderr
    figures("tracker-died-then-broken-shard", out, manifest, 2, after)
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["id"] for r in index] == [r["id"] for r in pq.read_table(manifest).to_pylist()]
    assert all(r["status"] == "ok" for r in index)
