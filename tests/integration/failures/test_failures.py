"""Failures land where they belong (issue 11, design.md §7.1): a problem of one row fails that row
with a precise error and the rest of its shard commits; an exception the pipeline raises for
a batch is retried once and then fails only that batch's rows; documented conditions end as
``error: …`` with their exit code, never a traceback."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import load_index, sdbatch_cli, write_manifest
from PIL import Image

from sdbatch.data.record import NO_CONDITIONING

TINY = ["--model", "builtin:tiny", "--steps", "2", "--batch-size", "4"]


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A few hundred bytes claiming side×side pixels: Pillow refuses it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def init_image_cases(folder: Path) -> dict[str, tuple[str, str]]:
    """id -> (init_image, a phrase its error must hold); the ``good`` rows must succeed."""
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "good.png")
    Image.new("RGB", (80, 80), (40, 40, 200)).save(folder / "wide.png")  # 6,400 px > max_pixels 4,096
    Image.effect_noise((128, 128), 90).convert("RGB").save(folder / "big.png")  # > 20,000 bytes
    (folder / "text.png").write_bytes(b"this is not an image at all")
    os.mkfifo(folder / "pipe.png")
    bomb_png(folder / "bomb.png")
    return {
        "good-1": (str(folder / "good.png"), ""),
        "good-2": (str(folder / "good.png"), ""),
        "wide": (str(folder / "wide.png"), "80x80 = 6,400 pixels, over limits.max_pixels (4,096); fix: downscale it"),
        "big": (str(folder / "big.png"), "TooLarge: "),
        "text": (str(folder / "text.png"), "UnidentifiedImageError: cannot identify the image format of its 27 bytes"),
        "fifo": (str(folder / "pipe.png"), "is not a regular file (a FIFO)"),
        "device": ("/dev/zero", "is not a regular file (a character device)"),
        "bomb": (str(folder / "bomb.png"), "DecompressionBombError: "),
        "gone": (str(folder / "missing.png"), "NotFound: "),
    }


LIMITS = ["--set", "limits.max_pixels=4096", "--set", "limits.max_init_image_bytes=20000",
          "--set", 'limits.init_image_roots=["/dev"]']  # /dev/zero is read only once its root is allowed


def init_rows(cases: dict[str, tuple[str, str]]) -> list[dict]:
    rows = [{"id": rid, "prompt": "a red square", "seed": i, "init_image": uri, "strength": 0.5}
            for i, (rid, (uri, _)) in enumerate(cases.items())]
    rows += [{"id": f"plain{i}", "prompt": "a blue circle", "seed": 50 + i, "init_image": None, "strength": None} for i in range(3)]
    return rows


# ---------------------------------------------------------------------------------------------
# one job through the CLI and Ray: every init-image problem fails its row, the rest commits


@pytest.fixture(scope="module")
def bad_init_job(ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-init")
    cases = init_image_cases(tmp / "img")
    manifest = write_manifest(tmp / "m.parquet", init_rows(cases))
    out = tmp / "out"
    run = sdbatch_cli(ray_address, "submit", manifest, "--out", out, *TINY, "--rows-per-shard", "12", *LIMITS)
    status = sdbatch_cli(ray_address, "status", out)
    return cases, out, run, status, [manifest, "--out", out, *TINY, "--rows-per-shard", "12", *LIMITS]


def test_each_init_image_problem_fails_only_its_row(bad_init_job):
    cases, out, run, *_ = bad_init_job
    assert run.returncode == 3, run.stderr
    index = {r["id"]: r for r in load_index(out)}
    assert len(index) == 12
    failed = {rid for rid, r in index.items() if r["status"] == "failed"}
    assert failed == {rid for rid in cases if not rid.startswith("good")}
    for rid, (uri, phrase) in cases.items():
        entry = index[rid]
        if rid.startswith("good"):
            assert entry["status"] == "ok" and (out / entry["key"]).is_file()
            continue
        assert entry["error"].startswith(f"row {rid}: init_image '{uri}'"), entry["error"]
        assert phrase in entry["error"] and "fix: " in entry["error"], entry["error"]
        assert "<_io.BytesIO" not in entry["error"] and entry["key"] is None
    assert "limits.max_init_image_bytes" in index["big"]["error"]
    # the same shard (one shard of 12 rows) committed its good rows
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["00000.parquet"]
    assert {r["status"] for rid, r in index.items() if rid.startswith("plain")} == {"ok"}


def test_the_console_and_status_list_the_failed_rows(bad_init_job):
    _, out, run, status, _ = bad_init_job
    assert "Traceback" not in run.stderr
    assert "error: 7 rows failed permanently" in run.stderr
    assert "  fifo: row fifo: init_image" in run.stderr and "  bomb: row bomb: init_image" in run.stderr
    assert status.returncode == 0, status.stderr
    assert "failed rows (first ones" in status.stdout and "  device: row device: init_image '/dev/zero'" in status.stdout
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_failed"] == 7 and {r["id"] for r in success["failed_rows"]} == {
        "wide", "big", "text", "fifo", "device", "bomb", "gone"}


def test_a_rerun_with_nothing_to_generate_names_the_failed_rows_and_the_fix(bad_init_job, ray_address):
    *_, submit_args = bad_init_job
    rerun = sdbatch_cli(ray_address, "submit", *submit_args)
    assert rerun.returncode == 3, rerun.stderr
    assert "error: nothing to generate: every shard is already committed; 7 rows failed permanently" in rerun.stderr
    assert "rerun with --retry-failed" in rerun.stderr and "  fifo: row fifo: init_image" in rerun.stderr


def test_repair_regenerates_exactly_the_rows_verify_flags(bad_init_job, ray_address):
    _, out, _, _, submit_args = bad_init_job
    index = {r["id"]: r for r in load_index(out)}
    (out / index["plain0"]["key"]).unlink()
    (out / index["good-1"]["key"]).write_bytes(b"not the image it was")
    kept = {rid: (out / index[rid]["key"]).read_bytes() for rid in ("plain1", "plain2", "good-2")}
    assert sdbatch_cli(ray_address, "verify", out).returncode == 1

    repaired = sdbatch_cli(ray_address, "submit", *submit_args, "--repair")
    assert repaired.returncode == 3, repaired.stderr  # the 7 failed rows are still failed (no --retry-failed)
    assert "regenerating 2 rows of 1 shard" in repaired.stderr
    progress = json.loads((out / "_sdbatch" / "progress.json").read_text())
    assert (progress["rows_done"], progress["rows_total"]) == (12, 12)  # not "14/12 done"
    check = sdbatch_cli(ray_address, "verify", out)
    assert check.returncode == 0 and "result     clean" in check.stdout, check.stdout
    after = {r["id"]: r for r in load_index(out)}
    assert {rid: (out / after[rid]["key"]).read_bytes() for rid in kept} == kept
    for rid in ("plain0", "good-1"):
        assert after[rid]["status"] == "ok" and (out / after[rid]["key"]).is_file()
    assert [rid for rid, r in after.items() if r["status"] == "failed"] == [rid for rid, r in index.items() if r["status"] == "failed"]


# ---------------------------------------------------------------------------------------------
# in process: metadata too large for JPEG EXIF, and a pipeline exception for one batch


class RaisingGenerator:
    """The real generator, except that a batch holding a row with ``prompt == poison`` raises
    as a broken pipeline would (no real pipeline fails for one batch on demand)."""

    def __init__(self, real, poison: str):
        self.real, self.poison = real, poison

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, rows, conditioning=NO_CONDITIONING):
        if any(r.prompt == self.poison for r in rows):
            raise ModuleNotFoundError("scipy`")
        return self.real.generate(rows, conditioning)


def run_one_shard(generator, tmp_path: Path, rows: list[dict], attempt: int = 1, **overrides):
    from sdbatch.manifest.reader import passthrough_types, read_rows
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    spec = load_spec(None, [], {"model.name": "builtin:tiny", "defaults.steps": 2, "resources.batch_size": 2, **overrides})
    source = open_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    storage = LocalStorage(tmp_path / "out")
    s = ShardSpec(0, range(source.num_rows))
    runner = ShardRunner(generator, storage, spec, passthrough=passthrough_types(source), job_fingerprint="failures-test")
    result = runner.run_shard(s, read_rows(source, spec, 0, source.num_rows), attempt)
    return result, {r["id"]: r for r in pq.read_table(tmp_path / "out" / "metadata" / "00000.parquet").to_pylist()}


def test_metadata_too_large_for_jpeg_exif_fails_that_row(tiny_generator, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "a red square", "seed": i, "note": "x" * (70_000 if i == 1 else 3)} for i in range(3)]
    result, index = run_one_shard(tiny_generator, tmp_path, rows, **{"output.image_format": "jpeg"})
    assert result.committed and result.rows_ok == 2 and result.rows_failed == 1
    assert index["r1"]["status"] == "failed" and index["r1"]["key"] is None
    assert index["r1"]["error"].startswith("row r1: MetadataTooLarge: metadata too large for a JPEG EXIF segment")
    assert "fix: " in index["r1"]["error"]
    assert not (tmp_path / "out" / "images" / "00000" / "r1.jpg").exists()
    assert all((tmp_path / "out" / index[r]["key"]).is_file() for r in ("r0", "r2"))


def test_a_pipeline_exception_is_retried_once_then_fails_only_its_batch(tiny_generator, tmp_path):
    from sdbatch.run.protocol import PipelineError

    rows = [{"id": f"r{i}", "prompt": "poison" if i == 2 else "a blue circle", "seed": i} for i in range(4)]
    generator = RaisingGenerator(tiny_generator, "poison")
    with pytest.raises(PipelineError, match=r"batch 00000-001 of shard 00000: ModuleNotFoundError: scipy`"):
        run_one_shard(generator, tmp_path, rows, attempt=1)
    assert not (tmp_path / "out" / "metadata").exists()  # nothing committed: the driver retries

    result, index = run_one_shard(generator, tmp_path, rows, attempt=2)
    assert result.committed and result.rows_failed == 2 and result.rows_ok == 2
    for rid in ("r2", "r3"):  # batch 1 of size 2 holds r2 and r3
        assert index[rid]["status"] == "failed"
        assert index[rid]["error"].startswith(
            f"row {rid}: the pipeline raised ModuleNotFoundError: scipy` for batch 00000-001 (after a retry on a fresh worker); fix: ")
    assert {rid for rid, r in index.items() if r["status"] == "ok"} == {"r0", "r1"}


def test_a_pipeline_exception_fails_its_rows_at_once_with_one_attempt(tiny_generator, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "poison" if i == 0 else "a blue circle", "seed": i} for i in range(2)]
    result, index = run_one_shard(RaisingGenerator(tiny_generator, "poison"), tmp_path, rows,
                                  **{"retries.shard_attempts": 1})
    assert result.committed and result.rows_failed == 2 and set(index) == {"r0", "r1"}
    assert "(not retried: retries.shard_attempts=1)" in index["r1"]["error"]


# ---------------------------------------------------------------------------------------------
# documented conditions: `error: …`, their exit code, never a traceback (no Ray needed)


def test_corrupt_job_state_files_name_the_file_and_the_recovery(ray_address, tmp_path):
    out = tmp_path / "out"
    (out / "_sdbatch").mkdir(parents=True)
    (out / "_sdbatch" / "job.json").write_text('{"fingerprint": "abc", "spec"')  # truncated
    result = sdbatch_cli(ray_address, "status", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and f"{out}/_sdbatch/job.json is corrupt" in result.stderr
    assert "--new-run" in result.stderr

    from sdbatch.output.documents import CorruptState
    from sdbatch.output.lock import JobLock
    from sdbatch.storage.local import LocalStorage

    (out / "_sdbatch" / "lock.json").write_text("garbage")
    with pytest.raises(CorruptState, match=r"lock\.json is corrupt .*sdbatch unlock OUT"):
        JobLock.acquire(LocalStorage(out))


def test_status_shows_what_it_can_beside_a_corrupt_progress_snapshot(ray_address, tmp_path):
    """Issue 21 finding 19(c): a corrupt progress.json does not stop `status`: the job, its
    commits and its result are shown, and the unreadable file is named with its recovery."""
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red square"}])
    out = tmp_path / "out"
    done = sdbatch_cli(ray_address, "submit", manifest, "--out", out, "--model", "builtin:null")
    assert done.returncode == 0, done.stderr
    (out / "_sdbatch" / "progress.json").write_text('{"state": "runn')  # truncated
    shown = {}
    for flags in ((), ("--json",)):
        result = sdbatch_cli(ray_address, "status", out, *flags)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert f"{out}/_sdbatch/progress.json is corrupt" in result.stdout
        assert "it is only a progress snapshot: delete it, the next run rewrites it" in result.stdout
        shown[flags] = result.stdout
    assert "state      finished" in shown[()] and "shards     1/? committed" in shown[()]
    assert "result     1 ok, 0 failed" in shown[()]
    assert json.loads(shown[("--json",)])["shards_committed"] == 1


def test_bad_deadline_and_unreadable_manifest_are_errors_not_tracebacks(ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red square"}])
    bad = sdbatch_cli(ray_address, "submit", manifest, "--out", tmp_path / "o", "--deadline", "25:00")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --deadline '25:00': not a clock time")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    for command in ("validate", "submit"):
        args = [command, tmp_path / "broken.parquet"] + (["--out", tmp_path / "o"] if command == "submit" else [])
        result = sdbatch_cli(ray_address, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and "broken.parquet" in result.stderr
    assert not (tmp_path / "o").exists()


def test_unlock_removes_only_a_lock_no_live_driver_holds(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from sdbatch.cli.app import app

    out = tmp_path / "out"
    (out / "_sdbatch").mkdir(parents=True)
    lock = out / "_sdbatch" / "lock.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()

    def holder(**fields) -> None:
        lock.parent.mkdir(exist_ok=True)  # a delete leaves no empty folder behind
        lock.write_text(json.dumps({"driver": "d" * 32, "host": socket.gethostname(), "pid": os.getpid(),
                                    "pid_ns": os.readlink("/proc/self/ns/pid"), "heartbeat_at": now,
                                    "expires_at": now + 60, **fields}))

    def unlock(*extra):
        return CliRunner().invoke(app, ["unlock", str(out), *extra])

    holder()  # this very process: alive
    refused = unlock()
    assert refused.exit_code == 2 and "may be alive" in refused.output and "its process is alive" in refused.output
    assert lock.exists()
    holder(host="another-host")  # elsewhere, lease not expired
    assert unlock().exit_code == 2 and lock.exists()
    holder(pid=int(dead.stdout))  # this host, its process gone
    removed = unlock()
    assert removed.exit_code == 0 and f"pid {int(dead.stdout)}" in removed.output and not lock.exists()
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("{garbage")
    assert "--force" in unlock().output and lock.exists()
    assert unlock("--force").exit_code == 0 and not lock.exists()
    assert "nothing to do" in unlock().output


def test_a_stray_metadata_file_and_a_truncated_index_are_not_taken_for_commits(tmp_path):
    from sdbatch.data.index import index_schema
    from sdbatch.output.commits import committed_shards, records_to_parquet
    from sdbatch.output.index import open_index
    from sdbatch.storage.local import LocalStorage

    storage = LocalStorage(tmp_path / "out")
    storage.put("metadata/00000.parquet",
                records_to_parquet([{"id": "a", "row": 0, "shard": "00000", "status": "ok"}], index_schema({}), "fp"))
    storage.put("metadata/summary.parquet", b"another tool's file")
    assert committed_shards(storage) == {"00000"}
    storage.put("index.parquet", b"PAR1-truncated")
    index = open_index(storage, "fp")  # the commits still hold every row
    assert not index.final and "not readable Parquet" in index.problem
    assert [i for b in index.batches(["id"]) for i in b.column("id").to_pylist()] == ["a"]


def test_a_mistyped_address_fails_within_seconds(ray_address, tmp_path):
    import time

    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red square"}])
    started = time.monotonic()
    result = sdbatch_cli(ray_address, "submit", manifest, "--out", tmp_path / "o", "--address", "127.0.0.1:1")
    assert time.monotonic() - started < 60  # ray.init alone would retry for minutes
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: --address '127.0.0.1:1': cannot reach a Ray cluster there (ConnectionRefusedError" in result.stderr
    assert not (tmp_path / "o" / "_sdbatch" / "lock.json").exists()


def test_an_unreachable_s3_manifest_is_an_error_not_a_traceback(ray_address, tmp_path):
    result = sdbatch_cli(ray_address, "submit", "s3://no-bucket/m.parquet", "--out", tmp_path / "o",
                         env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: manifest s3://no-bucket/m.parquet: cannot list or read it (OSError: ")
    assert "fix: check the URI, the endpoint" in result.stderr and not (tmp_path / "o").exists()


def test_a_cluster_that_cannot_place_a_worker_names_the_missing_resource(ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red square"}])
    result = sdbatch_cli(ray_address, "submit", manifest, "--out", tmp_path / "o", *TINY, "--gpus-per-worker", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "error: the Ray cluster cannot place one worker: not enough GPU (a worker needs 1, the cluster has 0)" in result.stderr
    assert not (tmp_path / "o" / "_sdbatch" / "lock.json").exists() and not (tmp_path / "o" / "metadata").exists()
