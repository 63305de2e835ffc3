"""SD3 with its T5 encoder present (issue 14; tests/test_model_families.py runs SD3 without
it): a tiny random-weight folder with a T5EncoderModel and a T5 tokenizer built from configs,
through the CLI; the T5 encoder is loaded, used, and covered by the model's pin."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from sdbatch.encode import read_embedded

EXPLICIT = (80, 64)


@pytest.fixture(scope="module")
def sd3_t5_job(ray_address, tmp_path_factory):
    from model_families import build_sd3

    tmp = tmp_path_factory.mktemp("sd3-t5")
    model = build_sd3(tmp / "sd3", t5=True)
    rows = [{"id": "t0", "prompt": "a red circle", "seed": 1, "width": None, "height": None},
            {"id": "e0", "prompt": "a blue square", "seed": 2, "width": EXPLICIT[0], "height": EXPLICIT[1]}]
    out = tmp / "out"
    result = cli(ray_address, "submit", write_manifest(tmp / "manifest.parquet", rows), "--out", out, "--model", model,
                 "--steps", "2", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    return {"out": out, "model": model, "index": {r["id"]: r for r in load_index(out)}}


def test_sd3_with_t5_renders_records_and_reproduces(sd3_t5_job):
    from model_families import NATIVE

    from sdbatch.audit import reproduce_row
    from sdbatch.models import fingerprint_model_dir

    index, out = sd3_t5_job["index"], sd3_t5_job["out"]
    for rid, size in (("t0", (NATIVE["sd3"],) * 2), ("e0", EXPLICIT)):
        data = (out / index[rid]["key"]).read_bytes()
        assert index[rid]["status"] == "ok" and hashlib.sha256(data).hexdigest() == index[rid]["sha256"]
        assert Image.open(io.BytesIO(data)).size == size
        assert read_embedded(data)[1]["model_family"] == "StableDiffusion3Pipeline"
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert job["model"]["fingerprint"] == fingerprint_model_dir(sd3_t5_job["model"])
    result = reproduce_row(str(out), "t0")
    assert result.match, (result.summary(), result.notes)


def test_sd3_t5_encoder_is_loaded_used_and_pinned(sd3_t5_job, tmp_path):
    from sdbatch.generate import Generator
    from sdbatch.manifest import Row
    from sdbatch.models import fingerprint_model_dir

    model = sd3_t5_job["model"]
    gen = Generator.load(str(model), device="cpu")
    assert type(gen.txt2img.text_encoder_3).__name__ == "T5EncoderModel"
    row = Row(0, "x", "a red circle", "", 1, 2, 5.0, 64, 64, "default")
    with_t5 = gen.generate([row]).pixels[0].astype(int)
    gen.txt2img.text_encoder_3 = None  # diffusers then gives the transformer zeros for the T5 tokens
    assert np.abs(with_t5 - gen.generate([row]).pixels[0]).max() > 0
    copy = shutil.copytree(model, tmp_path / "sd3")
    config = copy / "tokenizer_3" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 64}))
    assert fingerprint_model_dir(copy) != fingerprint_model_dir(model)
