"""FLUX.1 [dev] and [schnell] through the CLI (issue 24): tiny random-weight folders built from
diffusers' test configs (a locally built T5 tokenizer, no downloads), rendered at their native
size; the same rows with 1 and 2 workers give the same bytes, and alone (batch size 1) at most
one level apart; `reproduce` matches; the variant's defaults and meaning are recorded; what the
model would ignore is refused naming the row; a PEFT LoRA and its kohya-ss twin change the image
alike and a scale of 0 renders as none."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_reproduces, load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from sdbatch.output.encode import read_embedded

LONG_PROMPT = "a red circle " + "xyzzy " * 120  # ≈ 600 T5 tokens: past [dev]'s 512 and [schnell]'s 256
NATIVE = 128


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    from integration.model_families import FLUX_LORA_MODULES, build_flux, build_transformer_lora, flux_to_kohya

    root = tmp_path_factory.mktemp("flux")
    dev, schnell = build_flux(root / "flux-dev"), build_flux(root / "flux-schnell", dev=False)
    peft = build_transformer_lora(dev, root / "style.safetensors", seed=3, target_modules=list(FLUX_LORA_MODULES))
    return {"dev": dev, "schnell": schnell, "peft": peft, "kohya": flux_to_kohya(peft, root / "style_kohya.safetensors")}


ROWS = [
    {"id": "t0", "prompt": "a red circle", "seed": 1, "width": None, "loras": None, "init_image": None},
    {"id": "t1", "prompt": LONG_PROMPT, "seed": 2, "width": None, "loras": None, "init_image": None},
    {"id": "t2", "prompt": "a blue square", "seed": 3, "width": None, "loras": None, "init_image": None},
    {"id": "e0", "prompt": "a blue square", "seed": 4, "width": 96, "loras": None, "init_image": None},
    {"id": "i0", "prompt": "a green circle", "seed": 5, "width": None, "loras": None, "init_image": "init.png"},
    {"id": "p1", "prompt": "a red circle", "seed": 1, "width": None, "loras": "peft:1", "init_image": None},
    {"id": "k1", "prompt": "a red circle", "seed": 1, "width": None, "loras": "kohya:1", "init_image": None},
    {"id": "p0", "prompt": "a red circle", "seed": 1, "width": None, "loras": "peft:0", "init_image": None},
]


def submit(ray_address, tmp, model, rows, *args):
    tmp.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "init.png")
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    return cli(ray_address, "submit", manifest, "--out", tmp / "out", "--model", model, *map(str, args))


@pytest.fixture(scope="module")
def flux_jobs(flux_models, ray_address, tmp_path_factory):
    """[dev] with 1 worker, 2 workers and batch size 1; [schnell] with its own defaults: run two
    at a time on the session cluster's two CPUs. name -> (result, out)."""
    from concurrent.futures import ThreadPoolExecutor

    loras = ["--lora", f"peft={flux_models['peft']}", "--lora", f"kohya={flux_models['kohya']}"]
    common = ["--steps", "2", "--set", "defaults.strength=0.5", *loras]
    runs = {"w1": (flux_models["dev"], ROWS, ["--batch-size", "4", *common]),
            "w2": (flux_models["dev"], ROWS, ["--batch-size", "4", "--workers", "2", "--set", "resources.rows_per_shard=4", *common]),
            "b1": (flux_models["dev"], ROWS[:3], ["--batch-size", "1", *common]),
            "schnell": (flux_models["schnell"], ROWS[:2], ["--batch-size", "2"])}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(submit, ray_address, tmp_path_factory.mktemp(name), model, rows, *args)
                   for name, (model, rows, args) in runs.items()}
        jobs = {name: f.result() for name, f in futures.items()}
    for name, result in jobs.items():
        assert result.returncode == 0, (name, result.stderr)
    return {name: {r["id"]: r for r in load_index(_out(result))} | {"_out": _out(result)} for name, result in jobs.items()}


def _out(result) -> Path:
    return Path(result.args[result.args.index("--out") + 1])


def image(job, rid) -> bytes:
    return (job["_out"] / job[rid]["key"]).read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_flux_dev_renders_its_native_size_and_records_its_meaning(flux_jobs, flux_models):
    job = flux_jobs["w1"]
    for rid in ("t0", "t1", "i0", "p1"):
        assert Image.open(io.BytesIO(image(job, rid))).size == (NATIVE, NATIVE), rid
    assert Image.open(io.BytesIO(image(job, "e0"))).size == (96, NATIVE)
    assert {job[r]["status"] for r in ("t0", "e0", "i0")} == {"ok"}
    assert (job["t0"]["steps"], job["t0"]["guidance_scale"]) == (2, 3.5)  # --steps given; guidance the model's
    parameters, record = read_embedded(image(job, "t0"))
    assert "Distilled CFG Scale: 3.5," in parameters and "CFG scale" not in parameters  # as Forge writes [dev]'s
    assert record["model_family"] == "FluxPipeline"
    assert record["model_parameters"] == {"guidance": "distilled", "max_sequence_length": 512, "variant": "dev"}
    assert job["t0"]["prompt_truncated_at"] is None
    cut = job["t1"]["prompt_truncated_at"]  # where the T5 stops reading: 511 tokens after "a red circle"
    assert cut is not None and LONG_PROMPT[:cut].startswith("a red circle xyzzy") and cut < len(LONG_PROMPT)


def test_flux_is_deterministic_across_workers_and_batch_sizes(flux_jobs):
    one, two, alone = flux_jobs["w1"], flux_jobs["w2"], flux_jobs["b1"]
    assert one["i0"]["shard"] != two["i0"]["shard"]  # other shards (named in the record), the same batches
    for rid in ("t0", "t1", "e0", "i0", "p1", "k1"):
        assert one[rid]["batch_rows"] == two[rid]["batch_rows"], rid
        assert np.array_equal(pixels(image(one, rid)), pixels(image(two, rid))), rid
    for rid in ("t0", "t1", "t2"):  # per-row generators: a row alone is its batched self, to CPU rounding
        assert one[rid]["batch_rows"] != alone[rid]["batch_rows"]
        assert np.abs(pixels(image(one, rid)) - pixels(image(alone, rid))).max() <= 1, rid


def test_flux_reproduces_byte_identical(flux_jobs):
    assert_reproduces(flux_jobs["w1"]["_out"], "t0", "i0", "k1")


def test_flux_lora_changes_the_image_in_both_formats_and_scale_zero_is_none(flux_jobs, flux_models):
    assert flux_jobs["w1"]["p0"]["batch_rows"] == ["p0"] and flux_jobs["b1"]["t0"]["batch_rows"] == ["t0"]
    job = flux_jobs["w1"]
    base, peft, kohya, zero = (pixels(image(job, rid)) for rid in ("t0", "p1", "k1", "p0"))
    assert np.abs(peft - base).max() > 10
    assert np.abs(kohya - peft).max() <= 1  # the same weights in sd-scripts naming
    alone = pixels(image(flux_jobs["b1"], "t0"))  # p0 is alone in its batch, as t0 is with batch size 1
    assert np.array_equal(zero, alone)  # never fused: scale 0 is exactly no adapter
    sha = hashlib.sha256(flux_models["kohya"].read_bytes()).hexdigest()
    assert job["k1"]["loras"] == [{"name": "kohya", "scale": 1.0, "sha256": sha}]


def test_flux_schnell_takes_its_own_defaults(flux_jobs):
    job = flux_jobs["schnell"]
    assert (job["t0"]["steps"], job["t0"]["guidance_scale"]) == (4, 0.0)
    parameters, record = read_embedded(image(job, "t0"))
    assert record["model_parameters"] == {"guidance": "none", "max_sequence_length": 256, "variant": "schnell"}
    assert "Steps: 4, Sampler:" in parameters and "CFG" not in parameters  # guidance unused: not written
    cut = job["t1"]["prompt_truncated_at"]
    assert cut is not None and cut < flux_jobs["w1"]["t1"]["prompt_truncated_at"]  # 256 tokens, not 512


def test_flux_refuses_what_it_would_ignore_naming_the_row(flux_models, ray_address, tmp_path):
    rows = [{"prompt": "a red circle", "negative_prompt": None, "clip_skip": None, "scheduler": None, "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": "blurry", "clip_skip": None, "scheduler": None, "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": None, "clip_skip": 2, "scheduler": None, "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": None, "clip_skip": None, "scheduler": "flow_heun", "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": None, "clip_skip": None, "scheduler": None, "guidance_scale": 7.0}]
    result = submit(ray_address, tmp_path, flux_models["schnell"], rows, "--dry-run")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    lines = {n: next((ln for ln in err.splitlines() if f"row {n}" in ln), "") for n in range(5)}
    assert lines[0] == "" and "negative_prompt" in lines[1] and "no unconditional branch" in lines[1]
    assert "clip_skip" in lines[2] and "takes no clip_skip" in lines[2]
    assert "'flow_heun'" in lines[3] and "flow_euler" in lines[3]
    assert "guidance_scale" in lines[4] and "uses no guidance_scale" in lines[4]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_flux_dry_run_and_spec_say_what_the_parameters_mean(flux_models, ray_address, tmp_path):
    result = submit(ray_address, tmp_path, flux_models["schnell"], ROWS[:1], "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "FLUX.1 [schnell] (FluxPipeline): native size 128x128" in result.stdout and "default steps 4" in result.stdout
    assert "guidance_scale is unused" in result.stdout
    spec = cli(ray_address, "spec", "--set", f"model.name={flux_models['dev']}")
    assert spec.returncode == 0, spec.stderr
    assert "# model: FLUX.1 [dev] (FluxPipeline)" in spec.stdout and "distilled guidance embedding" in spec.stdout
    assert "steps: 28" in spec.stdout and "guidance_scale: 3.5" in spec.stdout and "width: 128" in spec.stdout
    assert json.loads((flux_models["dev"] / "transformer" / "config.json").read_text())["guidance_embeds"] is True
