"""A job with a speed profile, through the CLI on the session's Ray: the profile as applied is in
every image's record and infotext and in the job fingerprint; a resume with another profile
is refused naming it (exit 2, nothing written); `reproduce` applies it and says the profile
is not bit-reproducible across devices. The switches are the CPU-cheap ones (fused QKV;
compiling on CPU takes minutes: test_speed_profiles inspects it instead)."""

from __future__ import annotations

import json

import pytest
from conftest import image_hashes, load_index, write_manifest
from conftest import sdbatch_cli as cli

from sdbatch.output import encode

FAST_ON_CPU = ("--speed", "fast", "--set", "speed.regional_compile=false", "--set", "speed.cuda_graphs=false")
APPLIED = {"fuse_qkv": True}
SKIPPED = {"quantize": "needs a CUDA device; this worker runs on cpu"}


@pytest.fixture(scope="module")
def speed_job(ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed-job")
    rows = [{"id": f"r{i}", "prompt": ["a red circle", "a blue square"][i % 2], "seed": i} for i in range(4)]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    common = (manifest, "--model", "builtin:tiny", "--steps", "2", "--batch-size", "2")
    fast = cli(ray_address, "submit", *common, "--out", tmp / "fast", *FAST_ON_CPU)
    exact = cli(ray_address, "submit", *common, "--out", tmp / "exact")
    return {"tmp": tmp, "common": common, "fast": fast, "exact": exact}


def test_the_profile_is_in_every_record_and_infotext_and_exact_records_none(speed_job):
    assert speed_job["fast"].returncode == 0, speed_job["fast"].stderr[-3000:]
    assert speed_job["exact"].returncode == 0, speed_job["exact"].stderr[-3000:]
    for name, expected in (("fast", {"profile": "fast", "applied": APPLIED, "skipped": SKIPPED}), ("exact", None)):
        out = speed_job["tmp"] / name
        for entry in load_index(out):
            text, record = encode.read_embedded((out / entry["key"]).read_bytes())
            assert record.get("speed") == expected, (name, entry["id"])
            assert ("Speed profile: fast (fuse_qkv)" in text) == (name == "fast")
    fast_job = json.loads((speed_job["tmp"] / "fast" / "_sdbatch" / "job.json").read_text())
    exact_job = json.loads((speed_job["tmp"] / "exact" / "_sdbatch" / "job.json").read_text())
    assert fast_job["fingerprint"] != exact_job["fingerprint"]
    assert fast_job["spec"]["speed"]["profile"] == "fast"
    # fused QKV is a different matmul: the images may differ in their last bits, not more
    assert image_hashes(speed_job["tmp"] / "fast").keys() == image_hashes(speed_job["tmp"] / "exact").keys()


def test_a_resume_with_another_profile_is_refused_naming_it(speed_job, ray_address):
    out = speed_job["tmp"] / "fast"
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = cli(ray_address, "submit", *speed_job["common"], "--out", out, "--speed", "exact")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the speed profile (fast (fuse_qkv, quantize=auto) → exact)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_reproduce_applies_the_profile_and_says_it_is_not_bit_reproducible_across_devices(speed_job, ray_address):
    result = cli(ray_address, "reproduce", speed_job["tmp"] / "fast", "r1")
    assert result.returncode == 0, result.stderr[-3000:]  # same machine, same switches: the same bytes
    assert "speed profile 'fast' applied fuse_qkv: not bit-reproducible across devices" in " ".join(result.stderr.split())
