"""Issue 15: ``builtin:null`` through the whole job path on a mixed manifest (full batches, the
fill ratio in the summary, identical bytes across worker counts, shard orders and a resume,
``reproduce``), and the generation guards: NaN/black images retried with the VAE in float32
then failed, never stored; a batch that runs out of device memory generated in halves that
``reproduce`` rebuilds. The faults are injected here, in tests/, on a real tiny pipeline."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import image_hashes, load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from integration.audit.test_reproduce import mixed_rows, run_in_process
from sdbatch.data.record import NO_CONDITIONING

NULL_JOB = ["--model", "builtin:null", "--rows-per-shard", "16", "--batch-size", "8"]


def test_null_pictures_are_deterministic_and_cost_what_real_images_cost():
    from sdbatch.models.families.null import draw

    a, b = draw(7, 512, 512), draw(7, 512, 512)
    assert a.dtype == np.uint8 and a.shape == (512, 512, 3) and np.array_equal(a, b)
    assert (draw(8, 512, 512) != a).mean() > 0.9
    assert draw(7, 96, 64).shape == (64, 96, 3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    assert 250_000 <= len(buf.getvalue()) <= 600_000
    # smooth + noise: neighbours are close (no flat colour, no pure noise)
    step = np.abs(np.diff(a.astype(int), axis=1))
    assert 2 < step.mean() < 12


# ---------------------------------------------------------------------------------------------
# builtin:null through `sdbatch submit` on a mixed manifest


@pytest.fixture(scope="module")
def null_job(ray_address, tmp_path_factory):
    """96 rows interleaving 4 sizes × 3 samplers (8 rows per batch key), 2 workers."""
    root = tmp_path_factory.mktemp("null")
    manifest = write_manifest(root / "mixed.parquet", mixed_rows(96))
    out = root / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, *NULL_JOB, "--workers", "2")
    assert result.returncode == 0, result.stderr
    return manifest, out, result


def test_null_job_has_full_batches_and_reports_the_fill(null_job):
    _, out, result = null_job
    entries = load_index(out)
    assert len(entries) == 96 and {e["status"] for e in entries} == {"ok"}
    assert sorted(len(e["batch_rows"]) for e in entries) == [8] * 96
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["batch_fill"] == 1.0 and summary["batches"] == 12 and summary["batch_size"] == 8
    assert "batches 100% full" in result.stdout
    assert {e["dtype"] for e in entries} == {"uint8"}
    png = Image.open(out / entries[1]["key"])
    assert png.size == (entries[1]["width"], entries[1]["height"])


def test_null_job_bytes_match_one_worker_in_reverse_shard_order_and_a_resume(null_job, ray_address, tmp_path):
    from sdbatch.models.runtime import load_model

    manifest, out, _ = null_job
    reference = image_hashes(out)
    assert len(set(reference.values())) == 96
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    reverse = tmp_path / "reverse"
    run_in_process(load_model("builtin:null"), manifest, reverse, [5, 4, 3, 2, 1, 0], job_fingerprint=job["fingerprint"],
                   spec_overrides={"model.name": "builtin:null", "resources.rows_per_shard": 16, "resources.batch_size": 8,
                                   "defaults.steps": 20})
    assert image_hashes(reverse) == reference

    # a resume: shard 00002's commit lost (its images still stored) → regenerated and adopted
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("metadata/00002.parquet", "index.parquet", "_SUCCESS"):
        (resumed / name).unlink()
    result = cli(ray_address, "submit", manifest, "--out", resumed, *NULL_JOB)
    assert result.returncode == 0, result.stderr
    assert "5 shards already committed" in result.stdout
    assert image_hashes(resumed) == reference

    rid = load_index(out)[17]["id"]
    result = cli(ray_address, "reproduce", out, rid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 rows; record from the stored image" in result.stdout


# ---------------------------------------------------------------------------------------------
# guards, on a real tiny pipeline with the fault injected from here


@pytest.fixture(scope="module")
def tiny():
    import torch

    from sdbatch.models.runtime import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("builtin:tiny", device="cpu", dtype="auto")
    torch.set_num_threads(threads)


def guard_rows(n: int = 4):
    from sdbatch.data.row import Row

    return [Row(index=i, id=f"g{i}", prompt=f"a red square {i}", negative_prompt="", seed=50 + i, steps=2,
                guidance_scale=5.0, width=32, height=32, scheduler="ddim") for i in range(n)]


def spoil_decode(monkeypatch, generator, rows: dict[int, float], calls: int | None = None):
    """Make the VAE decode ``value`` for the given rows of the first batch decoded (NaN, or
    -1 = black) — also when a retry decodes some of them again — on the first ``calls``
    calls (None: always). Returns the list of batch sizes decoded."""
    vae = generator.txt2img.vae
    real = vae.decode
    seen: list[int] = []
    first: list = []

    def decode(latents, *args, **kwargs):
        out = real(latents, *args, **kwargs)
        seen.append(len(latents))
        if not first:
            first.extend(latents.float().clone())
        if calls is None or len(seen) <= calls:
            for j, latent in enumerate(latents.float()):
                origin = next(i for i, f in enumerate(first) if (f == latent).all())
                if origin in rows:
                    out[0][j] = rows[origin]
        return out

    monkeypatch.setattr(vae, "decode", decode)
    return seen


def test_a_nan_image_is_decoded_again_in_float32(tiny, monkeypatch):
    clean = tiny.generate(guard_rows())
    seen = spoil_decode(monkeypatch, tiny, {1: float("nan")}, calls=1)
    again = tiny.generate(guard_rows())
    assert seen == [4, 4]  # the batch, then the batch again in float32 (row 1 taken from it)
    assert again.errors == [None] * 4
    assert np.array_equal(again.pixels, clean.pixels)


def test_images_still_nan_or_black_fail_their_rows_and_are_not_stored(tiny, monkeypatch, tmp_path):
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    spoil_decode(monkeypatch, tiny, {0: -1.0, 2: float("nan")})
    spec = load_spec(None, [], {"model.name": "builtin:tiny", "resources.batch_size": 4})
    out = tmp_path / "out"
    result = ShardRunner(tiny, LocalStorage(out), spec, job_fingerprint="guard-test").run_shard(ShardSpec(0, range(4)), guard_rows())
    assert (result.rows_ok, result.rows_failed) == (2, 2)
    import pyarrow.parquet as pq

    entries = {e["id"]: e for e in pq.read_table(out / "metadata" / "00000.parquet").to_pylist()}
    assert entries["g0"]["status"] == "failed" and "all-black" in entries["g0"]["error"]
    assert entries["g2"]["status"] == "failed" and "NaN/inf" in entries["g2"]["error"]
    assert "float32" in entries["g2"]["error"]
    assert sorted(p.name for p in (out / "images" / "00000").iterdir()) == ["g1.png", "g3.png"]


class OutOfMemoryAbove:
    """A generator that raises CUDA's out-of-memory error for batches above ``limit`` rows."""

    def __init__(self, generator, limit: int):
        self.generator, self.limit, self.info = generator, limit, generator.info
        self.batches: list[int] = []

    def __getattr__(self, name):  # everything but generate() is the wrapped generator's
        return getattr(self.generator, name)

    def generate(self, rows, conditioning=NO_CONDITIONING):
        import torch

        self.batches.append(len(rows))
        if len(rows) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.generator.generate(rows, conditioning)


def test_out_of_memory_splits_the_batch_in_halves_that_reproduce_rebuilds(tiny, tmp_path):
    from sdbatch.audit.reproduce import reproduce_row

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"o{i}", "prompt": f"a blue circle {i}", "seed": i}
                                                       for i in range(6)])
    out = tmp_path / "out"
    oom = OutOfMemoryAbove(tiny, limit=2)
    run_in_process(oom, manifest, out, [0], spec_overrides={"defaults.steps": 2, "resources.batch_size": 6,
                                                            "defaults.width": 32, "defaults.height": 32})
    assert oom.batches == [6, 3, 2, 1, 3, 2, 1]
    entries = load_index(out)
    assert [e["batch_rows"] for e in entries] == [["o0", "o1"]] * 2 + [["o2"]] + [["o3", "o4"]] * 2 + [["o5"]]
    for rid in ("o1", "o2"):
        result = reproduce_row(str(out), rid)
        assert result.match and result.batch_rebuilt and result.batch_rows == next(
            e["batch_rows"] for e in entries if e["id"] == rid), result.notes

    single = OutOfMemoryAbove(tiny, limit=0)  # not even one row fits: the shard fails
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_process(single, manifest, tmp_path / "out2", [0], spec_overrides={"resources.batch_size": 6})
