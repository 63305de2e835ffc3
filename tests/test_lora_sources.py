"""LoRA adapters as users bring them (issue 14), through the CLI on builtin:shapes: a kohya-ss
format file (``lora_unet_…``, converted from the tests' PEFT LoRA), a PEFT file on ``s3://``
(the moto server), and a resume refused once an adapter's bytes changed. One job, many checks."""

from __future__ import annotations

import hashlib
import io
import uuid

import boto3
import numpy as np
import pytest
from PIL import Image

from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli


@pytest.fixture(scope="module")
def lora_sources_job(s3_server, ray_address, tmp_path_factory):
    from model_families import build_shapes_lora, to_kohya

    tmp = tmp_path_factory.mktemp("lora-sources")
    peft = build_shapes_lora(tmp / "a.safetensors", seed=1)
    kohya = to_kohya(peft, tmp / "a-kohya.safetensors")
    bucket = f"sdbatch-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="loras/a.safetensors", Body=peft.read_bytes())
    s3_uri = f"s3://{bucket}/loras/a.safetensors"
    rows = [{"id": f"{name}-{seed}", "prompt": "a red circle", "loras": loras, "seed": seed}
            for seed in (1, 2) for name, loras in (("base", None), ("k", "k"), ("s", "s:1"))]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    args = ("submit", manifest, "--out", out, "--steps", "3", "--batch-size", "4", "--lora", f"k={kohya}",
            "--lora", f"s={s3_uri}", "--s3-endpoint", s3_server)
    result = cli(ray_address, *args)
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    pixels = {rid: np.asarray(Image.open(io.BytesIO((out / r["key"]).read_bytes())).convert("RGB")).astype(int)
              for rid, r in index.items()}
    return {"index": index, "pixels": pixels, "args": args, "client": client, "bucket": bucket, "tmp": tmp,
            "sha": {"k": hashlib.sha256(kohya.read_bytes()).hexdigest(), "s": hashlib.sha256(peft.read_bytes()).hexdigest()}}


def test_kohya_lora_changes_the_image_as_its_peft_original(lora_sources_job):
    px = lora_sources_job["pixels"]
    for seed in (1, 2):
        base, kohya, peft = px[f"base-{seed}"], px[f"k-{seed}"], px[f"s-{seed}"]
        assert np.abs(kohya - base).max() > 10
        assert np.abs(kohya - peft).max() <= 1  # the same weights in kohya naming: the same image


def test_s3_lora_is_read_and_recorded(lora_sources_job):
    index, sha = lora_sources_job["index"], lora_sources_job["sha"]
    assert {r["status"] for r in index.values()} == {"ok"}
    assert index["s-1"]["loras"] == [{"name": "s", "scale": 1.0, "sha256": sha["s"]}]
    assert index["k-2"]["loras"] == [{"name": "k", "scale": 1.0, "sha256": sha["k"]}]
    assert np.abs(lora_sources_job["pixels"]["s-1"] - lora_sources_job["pixels"]["base-1"]).max() > 10


def test_resume_refused_after_an_adapter_changed(lora_sources_job, ray_address):
    from model_families import build_shapes_lora

    other = build_shapes_lora(lora_sources_job["tmp"] / "b.safetensors", seed=2)
    job = lora_sources_job
    job["client"].put_object(Bucket=job["bucket"], Key="loras/a.safetensors", Body=other.read_bytes())
    result = cli(ray_address, *job["args"])
    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())
    assert f"the LoRA s=s3://{job['bucket']}/loras/a.safetensors (sha256 {job['sha']['s'][:12]}…" in err, err
    assert "the LoRA k=" not in err  # only what changed is named
