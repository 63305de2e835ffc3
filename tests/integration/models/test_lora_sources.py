"""LoRA adapters as users bring them (issue 14), on builtin:shapes: a kohya-ss format file
(``lora_unet_…``, converted from the tests' PEFT LoRA) and a PEFT file read from ``s3://`` (the
moto server), rendered in process (the CLI path of adapters is tests/test_model_families.py's);
and, through the CLI, a resume refused once an adapter's bytes changed."""

from __future__ import annotations

import hashlib
import uuid

import boto3
import numpy as np
import pytest
from conftest import sdbatch_cli as cli
from conftest import write_manifest

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def lora_sources(s3_server, tmp_path_factory):
    from integration.model_families import build_shapes_lora, to_kohya

    tmp = tmp_path_factory.mktemp("lora-sources")
    peft = build_shapes_lora(tmp / "a.safetensors", seed=1)
    kohya = to_kohya(peft, tmp / "a-kohya.safetensors")
    bucket = f"sdbatch-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="loras/a.safetensors", Body=peft.read_bytes())
    return {"tmp": tmp, "client": client, "bucket": bucket, "endpoint": s3_server,
            "declared": {"k": str(kohya), "s": f"s3://{bucket}/loras/a.safetensors"},
            "sha": {"k": hashlib.sha256(kohya.read_bytes()).hexdigest(), "s": hashlib.sha256(peft.read_bytes()).hexdigest()}}


def test_kohya_and_s3_loras_load_and_change_the_image(lora_sources):
    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    gen = load_model("builtin:shapes", device="cpu", loras=lora_sources["declared"], endpoint_url=lora_sources["endpoint"])

    def image(seed: int, loras: tuple) -> np.ndarray:
        return gen.generate([Row(0, "x", PROMPT, "", seed, 2, 7.5, 64, 64, "default", loras=loras)]).pixels[0].astype(int)

    base, kohya, peft = image(1, ()), image(1, (("k", 1.0),)), image(1, (("s", 1.0),))
    assert np.abs(kohya - base).max() > 10
    assert np.abs(kohya - peft).max() <= 1  # the same weights in kohya naming: the same image
    assert gen.loras.record((("k", 1.0), ("s", 0.5))) == [
        {"name": "k", "scale": 1.0, "sha256": lora_sources["sha"]["k"]},
        {"name": "s", "scale": 0.5, "sha256": lora_sources["sha"]["s"]}]


def test_resume_refused_after_an_adapter_changed(lora_sources, ray_address):
    """OUT holds the job.json a submit of this manifest wrote; the s3 adapter's bytes change;
    the resume is refused (exit 2), naming that adapter and nothing else."""
    from integration.model_families import build_shapes_lora
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.resolve import preflight
    from sdbatch.output.claim import claim_job, job_record
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    tmp, declared = lora_sources["tmp"], lora_sources["declared"]
    manifest = write_manifest(tmp / "manifest.parquet", [{"prompt": PROMPT, "loras": "k"}, {"prompt": PROMPT, "loras": "s"}])
    out = tmp / "out"
    model = preflight("builtin:shapes")
    spec = load_spec(None, [], {f"loras.{n}": p for n, p in declared.items()}).with_model_defaults(model.traits)
    claim_job(LocalStorage(out), job_record(spec, open_manifest(str(manifest)), model.pin, lora_sources["sha"]))
    other = build_shapes_lora(tmp / "b.safetensors", seed=2)
    lora_sources["client"].put_object(Bucket=lora_sources["bucket"], Key="loras/a.safetensors", Body=other.read_bytes())
    result = cli(ray_address, "submit", manifest, "--out", out, "--s3-endpoint", lora_sources["endpoint"],
                 *(arg for n, p in declared.items() for arg in ("--lora", f"{n}={p}")))
    assert result.returncode == 2, result.stderr
    err = " ".join(result.stderr.split())
    assert f"the LoRA s={declared['s']} (sha256 {lora_sources['sha']['s'][:12]}…" in err, err
    assert "the LoRA k=" not in err and "the settings" not in err and "the manifest" not in err  # only what changed
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["job.json"]  # nothing else written
