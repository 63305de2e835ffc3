"""Reproducibility (issue 8): every image's bytes are a function of its row, its batch and the
model — not of worker counts, shard order, retries or resumes — and `sdbatch reproduce`
regenerates any image bit for bit from the output's metadata alone."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import image_hashes, load_index, small_rows, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from integration.chaos import chaos_env
from integration.faults import sdbatch_command
from sdbatch.output.encode import read_embedded

FAST = ["--model", "builtin:tiny", "--steps", "3", "--rows-per-shard", "6", "--batch-size", "4"]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def submit_args(manifest: Path, out: Path, *extra: str, env: dict | None = None) -> list[str]:
    return [*sdbatch_command(env), "submit", str(manifest), "--out", str(out), *FAST, *extra]


# ---------------------------------------------------------------------------------------------
# in-process: ShardRunner on shards in any order, and a retried (uncommitted) shard


@pytest.fixture(scope="module")
def tiny_generator():
    import torch

    from sdbatch.models.runtime import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with cpus_per_worker=1 runs
    yield load_model("builtin:tiny", device="cpu", dtype="auto")
    torch.set_num_threads(threads)


def run_in_process(generator, manifest: Path, out: Path, order: list[int], *, job_fingerprint: str | None = None,
                   spec_overrides: dict | None = None, batch_fit=None) -> dict:
    """Run the shards of ``manifest`` with ``worker.ShardRunner`` in the given order into a
    LocalStorage at ``out``; returns the job record (fingerprint computed as `sdbatch submit` does)."""
    from sdbatch.manifest.reader import passthrough_types, read_rows_at
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.resolve import preflight
    from sdbatch.output.claim import claim_job, job_record
    from sdbatch.output.index import merge_index
    from sdbatch.run.plan import job_plan
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    spec = load_spec(None, [], {"model.name": "builtin:tiny", "defaults.steps": 3, "resources.rows_per_shard": 6,
                                "resources.batch_size": 4, **(spec_overrides or {})})
    source = open_manifest(str(manifest))
    job = job_record(spec, source, preflight(spec.model.name).pin)
    if job_fingerprint:
        job = job.model_copy(update={"fingerprint": job_fingerprint})
    storage = LocalStorage(out)
    claim_job(storage, job)
    runner = ShardRunner(generator, storage, spec, worker_name="test", passthrough=passthrough_types(source),
                         job_fingerprint=job.fingerprint, batch_fit=batch_fit)
    plan = job_plan(source, spec)
    assert sorted(order) == list(range(plan.num_shards))
    for index in order:
        s = plan.shard(index)
        runner.run_shard(s, read_rows_at(source, spec, s.rows))
    merge_index(storage, [plan.shard(i).name for i in range(plan.num_shards)], source.num_rows,
                passthrough_types(source), job.fingerprint)
    return job


def twelve_rows(tmp: Path, **changes) -> Path:
    rows = [{"id": f"s{i:02d}", "prompt": f"a {['red', 'green', 'blue'][i % 3]} square {i}", "seed": 7 * i + 1}
            for i in range(12)]
    for rid, seed in changes.items():
        next(r for r in rows if r["id"] == rid)["seed"] = seed
    return write_manifest(tmp / f"m{len(changes)}.parquet", rows)


def test_shard_order_and_a_retried_shard_give_identical_bytes(tiny_generator, tmp_path):
    manifest = twelve_rows(tmp_path)
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    job = run_in_process(tiny_generator, manifest, forward, [0, 1])
    run_in_process(tiny_generator, manifest, backward, [1, 0])
    reference = image_hashes(forward)
    assert len(set(reference.values())) == 12
    assert image_hashes(backward) == reference

    # an attempt that died before its commit: images stored, no shard index. The retry
    # regenerates the shard, finds every key taken, adopts the stored objects — same bytes.
    from sdbatch.manifest.reader import read_rows
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.output.commits import metadata_key
    from sdbatch.output.index import INDEX_KEY
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.storage.local import LocalStorage

    storage = LocalStorage(backward)
    before = {p.name: p.read_bytes() for p in (backward / "images" / "00001").iterdir()}
    for key in (metadata_key("00001"), INDEX_KEY):
        storage.delete(key)
    spec = job.job_spec
    s = ShardSpec(1, range(6, 12))
    result = ShardRunner(tiny_generator, storage, spec, job_fingerprint=job.fingerprint).run_shard(
        s, read_rows(open_manifest(str(manifest)), spec, 6, 12), attempt=2)
    assert result.committed and result.images_adopted == 6 and result.images_created == 0
    assert {p.name: p.read_bytes() for p in (backward / "images" / "00001").iterdir()} == before
    entries = pq.read_table(backward / "metadata" / "00001.parquet").to_pylist()
    assert {e["id"]: e["sha256"] for e in entries} == {k: v for k, v in reference.items() if k in {e["id"] for e in entries}}
    assert all(e["attempt"] == 2 for e in entries)


def mixed_rows(n: int, sizes=((64, 64), (96, 64), (64, 96), (80, 80)), samplers=("ddim", "euler_a", "dpmpp_2m")) -> list[dict]:
    """``n`` rows interleaving 4 sizes × 3 samplers row by row (the worst case for row ranges)."""
    combos = [(w, h, s) for w, h in sizes for s in samplers]
    return [{"id": f"x{i:03d}", "prompt": f"a {['red', 'green', 'blue'][i % 3]} square {i}", "seed": 11 * i + 3,
             "width": combos[i % 12][0], "height": combos[i % 12][1], "scheduler": combos[i % 12][2]}
            for i in range(n)]


def test_mixed_manifest_gets_full_batches_with_identical_bytes_in_any_shard_order(tiny_generator, tmp_path):
    manifest = write_manifest(tmp_path / "mixed.parquet", mixed_rows(48))
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    overrides = {"defaults.steps": 2, "resources.rows_per_shard": 8}
    # 12 keys of 4 rows: 6 shards of two keys each
    run_in_process(tiny_generator, manifest, forward, [0, 1, 2, 3, 4, 5], spec_overrides=overrides)
    run_in_process(tiny_generator, manifest, backward, [5, 3, 1, 4, 2, 0], spec_overrides=overrides)
    reference = image_hashes(forward)
    assert len(reference) == 48 and len(set(reference.values())) == 48
    assert image_hashes(backward) == reference
    entries = load_index(forward)
    by_id = {e["id"]: e for e in entries}
    # 4 rows per batch key: every batch is one whole key, full at batch size 4
    assert sorted(len(e["batch_rows"]) for e in entries) == [4] * 48
    for e in entries:
        mates = [by_id[m] for m in e["batch_rows"]]
        assert {(m["width"], m["height"], m["scheduler"]) for m in mates} == {(e["width"], e["height"], e["scheduler"])}
    assert {pixels(forward / e["key"]).shape for e in entries} == {(64, 64, 3), (64, 96, 3), (96, 64, 3), (80, 80, 3)}


def test_changing_one_seed_changes_only_that_image(tiny_generator, tmp_path):
    base = tmp_path / "base"
    changed = tmp_path / "changed"
    run_in_process(tiny_generator, twelve_rows(tmp_path), base, [0, 1])
    (tmp_path / "other").mkdir()
    run_in_process(tiny_generator, twelve_rows(tmp_path / "other", s04=999), changed, [0, 1])
    a, b = {r["id"]: r for r in load_index(base)}, {r["id"]: r for r in load_index(changed)}
    assert pixels(base / a["s04"]["key"]).tolist() != pixels(changed / b["s04"]["key"]).tolist()
    for rid in a:
        if rid == "s04":
            continue
        # the batch-mates of s04 (s00..s03 share its batch) are untouched too
        assert np.array_equal(pixels(base / a[rid]["key"]), pixels(changed / b[rid]["key"])), rid
        _, ra = read_embedded((base / a[rid]["key"]).read_bytes())
        _, rb = read_embedded((changed / b[rid]["key"]).read_bytes())
        differing = {k for k in ra if ra[k] != rb.get(k)}
        assert not differing, (rid, differing)
    hashes_a, hashes_b = image_hashes(base), image_hashes(changed)  # every other sha256 kept
    assert hashes_a["s04"] != hashes_b["s04"]
    assert {k: v for k, v in hashes_a.items() if k != "s04"} == {k: v for k, v in hashes_b.items() if k != "s04"}


# ---------------------------------------------------------------------------------------------
# through the CLI on a real Ray cluster: worker counts, a killed driver, killed actors


@pytest.fixture(scope="module")
def module_manifest(tmp_path_factory):
    """conftest's ``small_rows`` (24 rows, 4 shards of 6), module-scoped."""
    return write_manifest(tmp_path_factory.mktemp("manifest") / "manifest.parquet", small_rows())


@pytest.fixture(scope="module")
def reference_run(ray_address, module_manifest, tmp_path_factory):
    """The manifest generated with 2 workers, uninterrupted: (out, id -> sha256)."""
    out = tmp_path_factory.mktemp("w2") / "out"
    result = cli(ray_address, "submit", module_manifest, "--out", out, *FAST, "--workers", "2")
    assert result.returncode == 0, result.stderr
    return out, image_hashes(out)


def test_two_workers_match_in_process_shards_in_reverse_order(reference_run, module_manifest, tiny_generator, tmp_path):
    out, w2 = reference_run
    assert len(w2) == 24 and len(set(w2.values())) == 24
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    reverse = tmp_path / "reverse"
    run_in_process(tiny_generator, module_manifest, reverse, [3, 2, 1, 0], job_fingerprint=job["fingerprint"])
    assert image_hashes(reverse) == w2


def test_killed_driver_and_killed_actors_give_the_same_bytes(reference_run, module_manifest, ray_address, tmp_path):
    _, reference = reference_run
    env = {**os.environ, "RAY_ADDRESS": ray_address}

    # 2. (started first, runs beside 1: one worker each on the session cluster's two CPUs)
    #    worker processes exit mid-shard (after a batch; images of the attempt partly stored)
    #    and the driver retries the shard on a fresh actor. Seed 15 / fraction 0.25 kills
    #    shard 00002 after its second batch on attempt 1 and nothing on attempt 2.
    markers = tmp_path / "chaos"
    markers.mkdir()
    chaos = tmp_path / "chaos-out"
    env_chaos = {**env, **chaos_env(markers, kill_fraction=0.25, seed=15)}
    chaos_log = tmp_path / "chaos.log"
    with open(chaos_log, "w") as log:  # a file, not a pipe: nobody reads it until the job ends
        chaos_job = subprocess.Popen(submit_args(module_manifest, chaos, "--workers", "1", "--set", "retries.shard_attempts=4",
                                                 env=env_chaos), env=env_chaos, stdout=log, stderr=log)

    try:
        # 1. the driver is SIGKILLed after its first commit, then the same command resumes
        resumed = tmp_path / "resumed"
        args = submit_args(module_manifest, resumed, "--workers", "1")
        driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while time.time() < deadline and not list((resumed / "metadata").glob("*.parquet")):
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert not (resumed / "_SUCCESS").exists()
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert re.search(r"\b[1-9]\d* shards? already committed", rerun.stdout.replace("\n", " ")), rerun.stdout  # however many the kill left
        assert image_hashes(resumed) == reference
    except BaseException:  # a failed step 1 leaves no job running
        chaos_job.kill()
        raise

    assert chaos_job.wait(timeout=600) == 0, chaos_log.read_text()
    kills = sorted(p.name.rsplit("-", 1)[0] for p in markers.iterdir())
    assert kills == ["kill-00002-a1-b1"], kills
    index = {r["id"]: r for r in load_index(chaos)}
    assert {r["attempt"] for r in index.values() if r["shard"] == "00002"} == {2}
    assert image_hashes(chaos) == reference


# ---------------------------------------------------------------------------------------------
# sdbatch reproduce: text-to-image, img2img and an ancestral sampler


@pytest.fixture(scope="module")
def mixed_job(ray_address, tmp_path_factory):
    """One shard of 12 rows: 6 txt2img DDIM rows (batches of 4 and 2), one DDIM row with clip
    skip 2 (a batch of its own), 3 Euler a rows in one batch, 2 img2img rows in one batch (an
    init image written here, relative path in the manifest)."""
    init = np.zeros((96, 80, 3), dtype=np.uint8)
    init[16:80, 10:70] = (220, 30, 30)
    init[::7] = 255
    tmp_path = tmp_path_factory.mktemp("mixed")
    (tmp_path / "inputs").mkdir()
    Image.fromarray(init).save(tmp_path / "inputs" / "init.png")
    rows = []
    for i in range(12):
        row = {"id": f"m{i:02d}", "prompt": f"a red circle number {i}", "seed": 1000 + i, "scheduler": None,
               "init_image": None, "strength": None, "clip_skip": 2 if i == 10 else None}
        if i in (3, 7, 11):
            row["scheduler"] = "euler_a"
        if i in (4, 9):
            row.update(init_image="inputs/init.png", strength=0.7)
        rows.append(row)
    manifest = write_manifest(tmp_path / "mixed.parquet", rows)
    out = tmp_path / "mixed-out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", "builtin:tiny", "--steps", "3",
                     "--rows-per-shard", "12", "--batch-size", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr
    return out, {r["id"]: r for r in load_index(out)}


def test_reproduce_txt2img_img2img_and_ancestral_rows(run_cli, mixed_job, tmp_path):
    out, index = mixed_job
    assert index["m04"]["status"] == "ok" and index["m04"]["init_image"].endswith("inputs/init.png")
    assert index["m04"]["batch_rows"] == ["m04", "m09"]
    assert index["m07"]["batch_rows"] == ["m03", "m07", "m11"]
    assert len(index["m05"]["batch_rows"]) == 4
    for rid in ("m09", "m07"):  # img2img, euler_a (txt2img: in process, below)
        target = tmp_path / f"{rid}.png"
        result = run_cli("reproduce", out, rid, "-o", target)
        assert result.returncode == 0, (rid, result.stdout, result.stderr)
        assert "bytes match" in result.stdout
        assert target.read_bytes() == (out / index[rid]["key"]).read_bytes()
    # img2img from the init image alone differs from text-to-image (the init image is used)
    assert not np.array_equal(pixels(out / index["m09"]["key"]), pixels(out / index["m00"]["key"]))


def test_clip_skip_row_end_to_end(run_cli, mixed_job, tmp_path):
    """clip_skip: its own batch, ``Clip skip: 2`` in the infotext, in the record and index; rows
    at the default write neither (their bytes are as before the column existed); reproduce
    matches from the image and from the index alone; and it changes the image."""
    from sdbatch.audit.reproduce import reproduce_row

    out, index = mixed_job
    row = index["m10"]
    assert row["clip_skip"] == 2 and row["batch_rows"] == ["m10"] and index["m00"]["clip_skip"] == 1
    text, record = read_embedded((out / row["key"]).read_bytes())
    assert "Clip skip: 2" in text and record["clip_skip"] == 2
    text, record = read_embedded((out / index["m00"]["key"]).read_bytes())
    assert "Clip skip" not in text and "clip_skip" not in record
    result = run_cli("reproduce", out, "m10", "-o", tmp_path / "m10.png")
    assert result.returncode == 0 and "bytes match" in result.stdout, (result.stdout, result.stderr)
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    original = (work / row["key"]).read_bytes()
    (work / row["key"]).unlink()
    rebuilt = reproduce_row(str(work), "m10")
    assert rebuilt.match and rebuilt.record_source == "index" and rebuilt.data == original
    # the same row without clip skip is another image
    from sdbatch.data.record import row_from_stored
    from sdbatch.models.runtime import load_model

    generator = load_model("builtin:tiny", device="cpu")
    with_skip = row_from_stored(row)
    without = dataclasses.replace(with_skip, clip_skip=1)
    a, b = (generator.generate([r]).pixels[0] for r in (with_skip, without))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_reproduce_in_process_reports_drift_and_rebuilds_a_deleted_image(mixed_job, tmp_path):
    from sdbatch.audit.job_output import AuditError
    from sdbatch.audit.reproduce import reproduce_row

    out, index = mixed_job
    result = reproduce_row(str(out), "m05")  # txt2img, batch of 4
    assert result.match and result.max_pixel_diff == 0 and result.batch_rows == index["m05"]["batch_rows"]
    assert result.record_source == "image" and result.data == (out / index["m05"]["key"]).read_bytes()
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    key = index["m06"]["key"]
    original = (work / key).read_bytes()
    (work / key).unlink()
    result = reproduce_row(str(work), "m06")
    assert result.match and result.record_source == "index" and result.data == original
    assert result.stored_sha256 is None and result.max_pixel_diff is None

    # a stored image whose pixels were changed: drift, with the largest pixel difference
    image = np.asarray(Image.open(io.BytesIO(original)).convert("RGB")).copy()
    image[0, 0, 0] ^= 0x10
    _, record = read_embedded(original)
    from sdbatch.output.encode import encode_image

    (work / key).write_bytes(encode_image(Image.fromarray(image), record))
    result = reproduce_row(str(work), "m06")
    assert result.match  # the regenerated bytes equal the index's recorded sha256 ...
    assert result.max_pixel_diff == 16 and result.stored_sha256 != result.recorded_sha256  # ... the stored object does not
    with pytest.raises(AuditError, match="no row with id"):
        reproduce_row(str(work), "nope")


def test_reproduce_names_an_init_image_that_changed_since_generation(run_cli, mixed_job, tmp_path):
    """The init image is replaced after the job ran: reproduce (and verify --regenerate) say
    which init image changed and show both hashes; putting it back makes reproduce match."""
    out, index = mixed_job
    init = Path(index["m04"]["init_image"])
    original = init.read_bytes()
    recorded = hashlib.sha256(original).hexdigest()
    assert index["m04"]["init_image_sha256"] == index["m09"]["init_image_sha256"] == recorded
    _, record = read_embedded((out / index["m04"]["key"]).read_bytes())
    assert record["init_image_sha256"] == recorded
    assert index["m00"]["init_image_sha256"] is None and index["m07"]["init_image_sha256"] is None

    # mixed_job is shared: work on a copy whose index and records name a copied init image.
    # The records are embedded in the images, so the copy is a fresh job over a copied input.
    work = tmp_path / "work"
    (work / "inputs").mkdir(parents=True)
    shutil.copyfile(init, work / "inputs" / "init.png")
    rows = [{"id": r["id"], "prompt": r["prompt"], "seed": r["seed"], "scheduler": r["scheduler"],
             "init_image": "inputs/init.png" if r["init_image"] else None, "strength": r["strength"]}
            for r in index.values() if r["id"] in ("m04", "m09")]
    manifest = write_manifest(work / "m.parquet", rows)
    result = run_cli("submit", manifest, "--out", work / "out", "--model", "builtin:tiny", "--steps", "3",
                     "--rows-per-shard", "12", "--batch-size", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr
    copy_init = work / "inputs" / "init.png"
    assert load_index(work / "out")[0]["init_image_sha256"] == recorded

    changed = np.asarray(Image.open(copy_init).convert("RGB")).copy()
    changed[:, :40] = (20, 200, 20)
    Image.fromarray(changed).save(copy_init)
    now = hashlib.sha256(copy_init.read_bytes()).hexdigest()
    assert now != recorded
    drifted = run_cli("reproduce", work / "out", "m09")
    text = " ".join((drifted.stdout + drifted.stderr).split())
    assert drifted.returncode == 1, text
    assert f"init image {copy_init} changed since generation" in text
    assert f"recorded sha256 {recorded[:12]}…, now {now[:12]}…" in text
    assert "expected to differ" in text and "DRIFT" in text and "bytes match" not in text

    report = run_cli("verify", work / "out", "--regenerate", "2", "--seed", "0")
    text = " ".join((report.stdout + report.stderr).split())
    assert report.returncode == 1, text
    assert text.count(f"init image {copy_init} changed since generation") == 2, text  # one note per row

    copy_init.write_bytes(original)
    restored = run_cli("reproduce", work / "out", "m09")
    assert restored.returncode == 0, (restored.stdout, restored.stderr)
    assert "bytes match" in restored.stdout and "changed since generation" not in restored.stdout + restored.stderr


def test_reproduce_bad_input_exits_2(run_cli, mixed_job, tmp_path):
    out, _ = mixed_job
    unknown = run_cli("reproduce", out, "no-such-row")
    assert unknown.returncode == 2 and "no row with id 'no-such-row'" in unknown.stderr
    nowhere = run_cli("reproduce", tmp_path / "nothing-here", "m00")
    assert nowhere.returncode == 2 and "no sdbatch job" in nowhere.stderr


def test_reproduce_and_verify_do_not_import_torch_when_not_regenerating():
    code = "import sys, sdbatch.cli, sdbatch.audit.verify, sdbatch.audit.reproduce; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_reproduce_refuses_an_unknown_id_and_a_failed_row_before_importing_torch(tmp_path):
    """The lookup (the row, its status, its batch-mates) comes before torch is imported: a bad
    ID or a row without an image is answered exit 2 by a process that never imported torch."""
    from synthetic_output import build_output, row_id

    out = build_output(tmp_path, 200, objects=False, rows_per_shard=100, failed_every=97)
    for wanted, said in ((row_id(96), "has status 'failed' (synthetic failure of row 96)"),
                         ("no-such-row", "no row with id 'no-such-row'")):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdbatch", "reproduce", str(out), wanted],
                                capture_output=True, text=True)
        assert result.returncode == 2 and said in " ".join(result.stderr.split()), result.stderr[-2000:]
        assert not re.search(r"\|\s+(torch|diffusers)$", result.stderr, re.MULTILINE)  # -X importtime lists every import


def test_reproduce_of_a_builtin_null_job_matches_without_importing_torch(tmp_path):
    """``builtin:null`` draws with numpy: its regeneration loads no torch (the process stays small)."""
    from sdbatch.models.runtime import load_model

    out = tmp_path / "out"
    run_in_process(load_model("builtin:null", device="cpu"), twelve_rows(tmp_path), out, [1, 0],
                   spec_overrides={"model.name": "builtin:null"})
    stored = hashlib.sha256((out / "images" / "00001" / "s07.png").read_bytes()).hexdigest()
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdbatch", "reproduce", str(out), "s07"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert f"s07: bytes match (sha256 {stored[:16]}…)" in result.stdout
    assert not re.search(r"\|\s+(torch|diffusers|transformers)$", result.stderr, re.MULTILINE)
