"""Model families and per-row LoRA (issue 14), through the CLI on real pipelines: tiny
random-weight SD 1.x, SD 2.x v-prediction, SDXL and SD3 folders built from configs once per
session, and two non-zero PEFT LoRAs on builtin:shapes."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from sdbatch.output.encode import read_embedded

LONG_PROMPT = " ".join(["a red circle on a blue square"] * 20)  # ≈ 140 tokens: past CLIP's 77
EXPLICIT = (80, 64)  # width, height


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    from integration.model_families import build_all

    return build_all(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def shapes_loras(tmp_path_factory):
    from integration.model_families import build_shapes_lora

    root = tmp_path_factory.mktemp("loras")
    return {name: build_shapes_lora(root / f"{name}.safetensors", seed=seed) for name, seed in (("a", 1), ("b", 2))}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def parse_with_sd_parsers(data: bytes):
    from sd_parsers import ParserManager

    return ParserManager().parse(Image.open(io.BytesIO(data)))


# ---------------------------------------------------------------------------------------------
# one CLI job per family: native size, explicit size, a long prompt, an img2img row


FAMILY_NAMES = ["sd15", "sd2v", "sdxl", "sd3"]


@pytest.fixture(scope="module")
def module_jobs(family_models, shapes_loras, ray_address, tmp_path_factory):
    """The module's five CLI jobs (one per family, then the LoRA job), started at once and run
    two at a time on the session cluster's two CPUs: a tiny job is mostly its processes
    starting (imports, model load, one core each), so two overlap on a 2-core machine.
    name -> Future of what its fixture below reads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {name: pool.submit(run_family_job, name, family_models[name], ray_address, tmp_path_factory)
                for name in FAMILY_NAMES}
        jobs["lora"] = pool.submit(run_lora_job, shapes_loras, ray_address, tmp_path_factory)
        yield jobs


def run_family_job(name: str, model: Path, ray_address: str, tmp_path_factory) -> dict:
    from integration.model_families import NATIVE

    tmp = tmp_path_factory.mktemp(f"job-{name}")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "init.png")
    rows = [
        {"id": "t0", "prompt": "a red circle", "seed": 1, "width": None, "height": None, "init_image": None},
        {"id": "t1", "prompt": LONG_PROMPT, "seed": 2, "width": None, "height": None, "init_image": None},
        {"id": "e0", "prompt": "a blue square", "seed": 3, "width": EXPLICIT[0], "height": EXPLICIT[1], "init_image": None},
        {"id": "i0", "prompt": "a green circle", "seed": 4, "width": None, "height": None, "init_image": "init.png"},
    ]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", model, "--steps", "2",
                 "--set", "defaults.strength=0.5", "--batch-size", "4")
    return {"name": name, "native": NATIVE[name], "out": out, "result": result, "model": model}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_job(request, module_jobs):
    return module_jobs[request.param].result()


def test_family_job_renders_native_and_explicit_sizes(family_job):
    result, out, native = family_job["result"], family_job["out"], family_job["native"]
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    assert {r["status"] for r in index.values()} == {"ok"}
    expected = {"t0": (native, native), "t1": (native, native), "e0": EXPLICIT, "i0": (native, native)}
    for rid, size in expected.items():
        data = (out / index[rid]["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == index[rid]["sha256"]
        assert Image.open(io.BytesIO(data)).size == size, rid
        assert (index[rid]["width"], index[rid]["height"]) == size
        _, record = read_embedded(data)
        assert record["model_family"] == json.loads((family_job["model"] / "model_index.json").read_text())["_class_name"]
        info = parse_with_sd_parsers(data)
        sampler = info.samplers[0]
        assert (int(sampler.parameters["seed"]), int(sampler.parameters["steps"])) == (index[rid]["seed"], 2)
        assert info.full_prompt == index[rid]["prompt"]
    assert index["i0"]["init_image_sha256"] is not None and index["t0"]["scheduler"] == "default"


def test_family_job_reads_long_prompts_whole_and_records_size_conditioning(family_job):
    result, out = family_job["result"], family_job["out"]
    index = {r["id"]: r for r in load_index(out)}
    assert index["t0"]["prompt_truncated_at"] is None
    # every family here reads prompts with CLIP: a long one is read whole, in 75-token chunks
    # (A1111's reading through compel; --literal-prompts cuts it: test_prompt_weights.py)
    assert index["t1"]["prompt_truncated_at"] is None
    assert read_embedded((out / index["t1"]["key"]).read_bytes())[1]["prompt_syntax"] == "a1111"
    assert "prompt_truncated_at" not in result.stderr  # nothing was cut, nothing to warn about
    _, record = read_embedded((out / index["e0"]["key"]).read_bytes())
    if family_job["name"] == "sdxl":
        h_w = [EXPLICIT[1], EXPLICIT[0]]
        assert record["size_conditioning"] == {"original_size": h_w, "target_size": h_w, "crops_coords_top_left": [0, 0]}
    else:
        assert "size_conditioning" not in record


def test_family_job_reproduces_byte_identical(family_job):
    from sdbatch.audit.reproduce import reproduce_row

    for rid in ("t0", "i0"):
        result = reproduce_row(str(family_job["out"]), rid)
        assert result.match, (rid, result.summary(), result.notes)


def test_family_refuses_samplers_it_cannot_use(family_models, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle", "scheduler": "ddim"},
                                                       {"prompt": "a red circle", "scheduler": "flow_euler"}])
    for name, bad_row, value in (("sd3", 0, "ddim"), ("sd15", 1, "flow_euler")):
        out = tmp_path / f"out-{name}"
        result = cli(ray_address, "submit", manifest, "--out", out, "--model", family_models[name], "--steps", "2")
        assert result.returncode == 2, result.stderr
        line = next(ln for ln in result.stderr.splitlines() if f"row {bad_row}" in ln)
        assert f"'{value}'" in line and "scheduler" in line
        assert ("flow_heun" in line) == (name == "sd3") and ("euler_a" in line) == (name == "sd15")
        assert not out.exists() or not any(out.rglob("*.png"))


def test_unsupported_pipeline_class_exits_2(family_models, ray_address, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(family_models["sd15"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle"}])
    result = cli(ray_address, "submit", manifest, "--out", tmp_path / "out", "--model", folder)
    assert result.returncode == 2
    assert "KandinskyPipeline" in result.stderr and "StableDiffusionXLPipeline" in result.stderr


# ---------------------------------------------------------------------------------------------
# per-row LoRA on builtin:shapes: one job, many checks

LORA_GROUPS = {  # id prefix -> (prompt, loras column)
    "base": ("a red circle", None),
    "a1": ("a red circle", "a:1"),
    "tag": ("a red circle <lora:a:1>", None),
    "a0": ("a red circle", "a:0"),
    "b1": ("a red circle", "b"),
    "ab": ("a red circle", "b:1,a:1"),
    "half": ("a red circle <lora:a:0.5>", None),
}


def run_lora_job(shapes_loras, ray_address: str, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lora-job")
    # groups interleaved in the manifest: the plan must still batch each adapter set alone
    rows = [{"id": f"{g}-{seed}", "prompt": p, "loras": c, "seed": seed}
            for seed in (1, 2) for g, (p, c) in LORA_GROUPS.items()]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--steps", "3", "--batch-size", "4",
                 "--lora", f"a={shapes_loras['a']}", "--lora", f"b={shapes_loras['b']}")
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    data = {rid: (out / r["key"]).read_bytes() for rid, r in index.items()}
    return {"out": out, "index": index, "data": data}


@pytest.fixture(scope="module")
def lora_job(module_jobs):
    return module_jobs["lora"].result()


def test_lora_changes_the_image_and_scale_zero_is_no_adapter(lora_job):
    px = {rid: pixels(d) for rid, d in lora_job["data"].items()}
    for seed in (1, 2):
        base, a1, a0, b1, ab, tag, half = (px[f"{g}-{seed}"] for g in ("base", "a1", "a0", "b1", "ab", "tag", "half"))
        assert np.abs(a1.astype(int) - base).max() > 10
        assert np.array_equal(a0, base)  # never fused: scale 0 is exactly no adapter
        assert np.array_equal(tag, a1)  # the prompt tag and the column mean the same
        assert not np.array_equal(ab, a1) and not np.array_equal(ab, b1) and not np.array_equal(b1, a1)
        assert not np.array_equal(half, a1) and not np.array_equal(half, base)


def test_lora_batches_never_mix_adapter_sets(lora_job):
    index = lora_job["index"]
    for entry in index.values():
        mates = {tuple((a["name"], a["scale"]) for a in index[m]["loras"]) for m in entry["batch_rows"]}
        assert len(mates) == 1, entry["batch_rows"]
    assert set(index["a1-1"]["batch_rows"]) == {"a1-1", "a1-2", "tag-1", "tag-2"}
    assert index["tag-1"]["prompt"] == "a red circle"  # the tag is not given to the text encoder


def test_lora_recorded_in_index_record_and_infotext(lora_job, shapes_loras):
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in shapes_loras.items()}
    entry = lora_job["index"]["ab-1"]
    assert entry["loras"] == [{"name": "a", "scale": 1.0, "sha256": sha["a"]}, {"name": "b", "scale": 1.0, "sha256": sha["b"]}]
    assert lora_job["index"]["base-1"]["loras"] == []
    text, record = read_embedded(lora_job["data"]["ab-1"])
    assert record["loras"] == entry["loras"]
    info = parse_with_sd_parsers(lora_job["data"]["ab-1"])
    assert info.full_prompt == "a red circle <lora:a:1> <lora:b:1>"
    assert info.raw_parameters["parameters"].count(f'Lora hashes: "a: {sha["a"][:10]}, b: {sha["b"][:10]}"') == 1
    assert "<lora:a:0.5>" in read_embedded(lora_job["data"]["half-2"])[0]
    job = json.loads((lora_job["out"] / "_sdbatch" / "job.json").read_text())
    assert {n: v["sha256"] for n, v in job["loras"].items()} == sha


def test_lora_rows_reproduce(lora_job):
    from sdbatch.audit.reproduce import reproduce_row

    for rid in ("ab-2", "a0-1"):
        result = reproduce_row(str(lora_job["out"]), rid)
        assert result.match, (rid, result.summary(), result.notes)


def test_lora_bad_references_exit_2(shapes_loras, ray_address, tmp_path):
    rows = [{"prompt": "a red circle", "loras": "zzz:1"}, {"prompt": "a red circle", "loras": "a:x"},
            {"prompt": "a red circle <lora:a:1", "loras": None}, {"prompt": "fine", "loras": "a:0.5"}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--lora", f"a={shapes_loras['a']}")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert "row 0" in err and "zzz" in err and "row 1" in err and "'x' is not a number" in err
    assert "row 2" in err and "no closing '>'" in err and "row 3" not in err
    assert not out.exists() or not any(out.rglob("*.png"))
    pickle = tmp_path / "evil.safetensors"  # a pickle under a safetensors name: its bytes are checked
    pickle.write_bytes(b"\x80\x04\x95not a safetensors file at all")
    refused = cli(ray_address, "submit", manifest, "--out", out, "--lora", f"a={pickle}")
    assert refused.returncode == 2 and "not a safetensors file" in refused.stderr and "a=" in refused.stderr
    assert not out.exists() or not any(out.rglob("*.png"))


def test_lora_declarations_refuse_pickle_files_and_bad_names():
    from sdbatch.spec import SpecError, load_spec

    with pytest.raises(SpecError, match="pickle checkpoints are refused"):
        load_spec(None, ["loras.a=style.ckpt"])
    with pytest.raises(SpecError, match="expected NAME=PATH"):
        load_spec(None, ["loras.a b=style.safetensors"])


def test_job_fingerprint_covers_adapter_bytes(tmp_path):
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.output.claim import job_record
    from sdbatch.spec import JobSpec

    source = open_manifest(str(write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle"}])))
    spec = JobSpec(loras={"a": str(tmp_path / "a.safetensors")})
    one, other = (job_record(spec, source, "f" * 64, {"a": sha}).fingerprint for sha in ("1" * 64, "2" * 64))
    assert one != other
