"""Chroma through the CLI (issue 24): a tiny random-weight ChromaPipeline (diffusers' test
config, a locally built T5 tokenizer) renders at its native size with two workers; its
guidance is real CFG, so a negative prompt changes the image; `reproduce` (one process)
regenerates every sampled row byte for byte; a LoRA changes the image and a scale of 0 renders
as none; clip_skip (no CLIP encoder) is refused naming the row."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from sdbatch.output.encode import read_embedded

ROWS = [
    {"id": "t0", "prompt": "a red circle", "negative_prompt": None, "seed": 1, "loras": None, "init_image": None},
    {"id": "n0", "prompt": "a red circle", "negative_prompt": "a blue square", "seed": 1, "loras": None, "init_image": None},
    {"id": "i0", "prompt": "a green circle", "negative_prompt": None, "seed": 2, "loras": None, "init_image": "init.png"},
    {"id": "l1", "prompt": "a red circle", "negative_prompt": None, "seed": 1, "loras": "style:1", "init_image": None},
    {"id": "l0", "prompt": "a red circle", "negative_prompt": None, "seed": 1, "loras": "style:0", "init_image": None},
]


@pytest.fixture(scope="module")
def chroma_job(ray_address, tmp_path_factory):
    from integration.model_families import FLUX_LORA_MODULES, build_chroma, build_transformer_lora

    tmp = tmp_path_factory.mktemp("chroma")
    model = build_chroma(tmp / "chroma")
    lora = build_transformer_lora(model, tmp / "style.safetensors", seed=4, target_modules=list(FLUX_LORA_MODULES))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "init.png")
    manifest = write_manifest(tmp / "manifest.parquet", ROWS)
    result = cli(ray_address, "submit", manifest, "--out", tmp / "out", "--model", model, "--steps", "2", "--batch-size", "2",
                 "--workers", "2", "--rows-per-shard", "2", "--set", "defaults.strength=0.5", "--lora", f"style={lora}")
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(tmp / "out")}
    return {"out": tmp / "out", "index": index, "model": model,
            "pixels": {rid: np.asarray(Image.open(io.BytesIO((tmp / "out" / r["key"]).read_bytes())).convert("RGB")).astype(int)
                       for rid, r in index.items()}}


def test_chroma_renders_native_with_cfg_and_its_own_defaults(chroma_job):
    index, px = chroma_job["index"], chroma_job["pixels"]
    assert {r["status"] for r in index.values()} == {"ok"} and {p.shape for p in px.values()} == {(128, 128, 3)}
    assert index["t0"]["guidance_scale"] == 5.0  # the pipeline's own, left null in the spec
    assert np.abs(px["n0"] - px["t0"]).max() > 0  # real CFG: the negative prompt is used
    _, record = read_embedded((chroma_job["out"] / index["t0"]["key"]).read_bytes())
    assert record["model_family"] == "ChromaPipeline" and record["model_parameters"] == {"max_sequence_length": 512}


def test_chroma_lora_changes_the_image_and_scale_zero_is_none(chroma_job):
    index, px = chroma_job["index"], chroma_job["pixels"]
    assert np.abs(px["l1"] - px["l0"]).max() > 10
    assert index["l0"]["batch_rows"] == ["l0"] and index["l1"]["batch_rows"] == ["l1"]


def test_chroma_rows_from_two_workers_reproduce_byte_identical(chroma_job):
    from sdbatch.audit.reproduce import reproduce_row

    assert len({r["shard"] for r in chroma_job["index"].values()}) > 1
    for rid in ("n0", "i0", "l0"):
        result = reproduce_row(str(chroma_job["out"]), rid)
        assert result.match, (rid, result.summary(), result.notes)


def test_chroma_refuses_clip_skip_naming_the_row(chroma_job, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle", "clip_skip": None},
                                                       {"prompt": "a red circle", "clip_skip": 2}])
    result = cli(ray_address, "submit", manifest, "--out", tmp_path / "out", "--model", chroma_job["model"], "--dry-run")
    assert result.returncode == 2, result.stderr
    line = next(ln for ln in result.stderr.splitlines() if "row 1" in ln)
    assert "clip_skip" in line and "takes no clip_skip" in line and "row 0" not in result.stderr
