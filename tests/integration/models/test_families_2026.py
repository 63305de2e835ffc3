"""The LLM-encoder families of issue 24 (Z-Image, Z-Image-Turbo, Qwen-Image, FLUX.2 [klein] and [dev]) and
SD3.5's layouts, through the CLI on tiny random-weight folders (``integration.families_2026``):
each renders at its native size, is the same with one worker and batches of 4 as with two
workers and batches of 1 (within the one uint8 level a batch may move a pixel, design.md §4.3),
reproduces byte for byte, and refuses what it cannot run with exit 2 naming the row."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_reproduces, load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from sdbatch.output.encode import read_embedded

EXPLICIT = (96, 64)  # width, height: on every family's grid


def _build(name: str, root: Path) -> Path:
    from integration import families_2026

    return getattr(families_2026, f"build_{name}")(root / name)


@pytest.fixture(scope="session")
def llm_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-families")
    return {name: _build(name, root) for name in FAMILIES}


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory) -> Path:
    """FLUX.2 [klein] base (not step-distilled), for the tests that read or run it in-process."""
    return _build("flux2_klein", tmp_path_factory.mktemp("klein-base"))


@dataclass(frozen=True)
class Case:
    native: int
    parameters: dict  # the record's model_parameters
    negative: bool = True  # rows may set a negative prompt
    img2img: bool = True  # the family has an img2img pipeline
    guidance: float | None = 2.0  # --guidance-scale (None: the model's own default)


#: family folder -> what its job runs
FAMILIES = {
    "z_image": Case(1024, {"max_sequence_length": 512}),
    "qwen_image": Case(256, {"guidance": "true_cfg", "max_sequence_length": 512}),
    "sd35_medium": Case(64, {}),
    "flux2_klein_distilled": Case(256, {"guidance": "none", "max_sequence_length": 512, "variant": "distilled"},
                                  negative=False, img2img=False, guidance=None),
    "flux2_dev": Case(256, {"guidance": "distilled", "max_sequence_length": 512}, negative=False, img2img=False),
}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _rows(negative: bool, img2img: bool) -> list[dict]:
    rows = [
        {"id": "t0", "prompt": "a red circle", "seed": 1, "width": None, "height": None, "init_image": None,
         "negative_prompt": "blurry" if negative else None},
        {"id": "t1", "prompt": "a blue square on a green circle", "seed": 2, "width": None, "height": None,
         "init_image": None, "negative_prompt": None},
        {"id": "e0", "prompt": "a blue square", "seed": 3, "width": EXPLICIT[0], "height": EXPLICIT[1],
         "init_image": None, "negative_prompt": None},
        {"id": "i0", "prompt": "a green circle", "seed": 4, "width": None, "height": None, "init_image": "init.png",
         "negative_prompt": None},
    ]
    return rows if img2img else rows[:-1]


def run_pair(name: str, model: Path, ray_address: str, tmp_path_factory) -> dict:
    """The family's manifest run twice: one worker with batches of 4, two workers with batches of 1."""
    tmp = tmp_path_factory.mktemp(f"llm-job-{name}")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "init.png")
    case = FAMILIES[name]
    manifest = write_manifest(tmp / "manifest.parquet", _rows(case.negative, case.img2img))
    guidance = () if case.guidance is None else ("--guidance-scale", str(case.guidance))
    runs = {}
    for label, workers, batch in (("one", 1, 4), ("two", 2, 1)):
        out = tmp / f"out-{label}"
        result = cli(ray_address, "submit", manifest, "--out", out, "--model", model, "--steps", "2", *guidance,
                     "--set", "defaults.strength=0.5", "--workers", str(workers),
                     "--batch-size", str(batch), "--gpus-per-worker", "0")
        runs[label] = {"out": out, "result": result}
    return {"name": name, "model": model, **runs}


@pytest.fixture(scope="module")
def module_runs(llm_models, ray_address, tmp_path_factory):
    """Every family's pair of jobs, two at a time on the session cluster's two CPUs (a tiny job
    is mostly its processes starting). name -> Future of ``run_pair``'s result."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(run_pair, name, llm_models[name], ray_address, tmp_path_factory) for name in FAMILIES}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_runs(request, module_runs):
    return module_runs[request.param].result()


def test_family_renders_native_size_records_and_infotext(family_runs):
    native = FAMILIES[family_runs["name"]].native
    class_name = json.loads((family_runs["model"] / "model_index.json").read_text())["_class_name"]
    for label in ("one", "two"):
        result, out = family_runs[label]["result"], family_runs[label]["out"]
        assert result.returncode == 0, result.stderr
        index = {r["id"]: r for r in load_index(out)}
        assert {r["status"] for r in index.values()} == {"ok"}
        expected = {"t0": (native, native), "t1": (native, native), "e0": EXPLICIT, "i0": (native, native)}
        assert set(index) == set(expected) if FAMILIES[family_runs["name"]].img2img else set(index) == {"t0", "t1", "e0"}
        for rid in index:
            size = expected[rid]
            data = (out / index[rid]["key"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == index[rid]["sha256"]
            assert Image.open(io.BytesIO(data)).size == size == (index[rid]["width"], index[rid]["height"]), rid
            infotext, record = read_embedded(data)
            assert record["model_family"] == class_name
            if record.get("model_parameters", {}).get("guidance") == "distilled":  # as Forge labels it
                assert "Distilled CFG Scale: 2.0," in infotext and "CFG scale" not in infotext
            assert record.get("model_parameters", {}) == FAMILIES[family_runs["name"]].parameters
            assert pixels(data).std() > 5, rid  # a picture, not a flat fill


def test_family_same_images_with_one_or_two_workers_and_any_batch_size(family_runs):
    one, two = ({r["id"]: r for r in load_index(family_runs[k]["out"])} for k in ("one", "two"))
    assert len({tuple(r["batch_rows"]) for r in one.values() if r["width"] == r["height"]}) < 3  # batched
    assert all(len(r["batch_rows"]) == 1 for r in two.values())
    for rid in one:
        a, b = (pixels((family_runs[k]["out"] / idx[rid]["key"]).read_bytes()) for k, idx in (("one", one), ("two", two)))
        assert np.abs(a.astype(int) - b).max() <= 1, rid  # design.md §4.3: a batch moves a pixel by one level at most
    t0, t1 = (pixels((family_runs["two"]["out"] / two[r]["key"]).read_bytes()) for r in ("t0", "t1"))
    assert np.abs(t0.astype(int) - t1).max() > 10  # seeds and prompts matter


def test_family_reproduces_byte_identical(family_runs):
    assert_reproduces(family_runs["one"]["out"], *(("t0", "i0") if FAMILIES[family_runs["name"]].img2img else ("t0", "e0")))


def test_sd35_layouts_load_as_sd3_with_their_attention(tmp_path):
    """SD3.5 Large (qk-norm) and Medium (qk-norm + dual attention) folders are the SD3 family,
    built with their layout, and render at the native size (Medium runs through the CLI above)."""
    from integration.families_2026 import build_sd35_large, build_sd35_medium
    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    for build, dual in ((build_sd35_large, False), (build_sd35_medium, True)):
        gen = load_model(str(build(tmp_path / build.__name__.removeprefix("build_"))), device="cpu")
        block = gen.txt2img.transformer.transformer_blocks[0]
        assert gen.info.family == "StableDiffusion3Pipeline" and type(block.attn.norm_q).__name__ == "RMSNorm"
        assert (block.attn2 is not None) == dual
        image = gen.generate([Row(0, "x", "a red circle", "", 1, 2, 5.0, 64, 64, "default")]).pixels[0]
        assert image.shape == (64, 64, 3) and image.std() > 5


def test_refusals_exit_2_naming_the_row(llm_models, ray_address, tmp_path):
    """clip_skip on a model without a CLIP encoder, and a size off the model's grid (VAE factor ×
    patch: 32 for this Z-Image), are refused at validation: exit 2, the row named, nothing written."""
    rows = [{"prompt": "a red circle", "clip_skip": 2, "width": None},
            {"prompt": "a red circle", "clip_skip": None, "width": 72},
            {"prompt": "a red circle", "clip_skip": None, "width": 96}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", llm_models["z_image"], "--steps", "2")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    clip_line = next(ln for ln in err.splitlines() if "row 0" in ln)
    assert "clip_skip" in clip_line and "Z-Image" in clip_line
    size_line = next(ln for ln in err.splitlines() if "row 1" in ln)
    assert "width" in size_line and "72" in size_line and "multiple of 32" in size_line
    assert "row 2" not in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*.png"))


def test_variants_defaults_and_meaning_read_from_configs(llm_models, klein_base, tmp_path):
    """Z-Image-Turbo (its scheduler config) and FLUX.2 [klein] base vs step-distilled
    (model_index.json is_distilled) get their own defaults and guidance meaning; the grid and
    native size come from the VAE and patch configs."""
    from integration.families_2026 import build_z_image
    from sdbatch.models.families import local_traits

    turbo = local_traits(build_z_image(tmp_path / "turbo", turbo=True))
    base = local_traits(llm_models["z_image"])
    assert (turbo.variant, dict(turbo.defaults), turbo.guidance) == ("turbo", {"steps": 9, "guidance_scale": 0.0}, "cfg")
    assert (base.variant, dict(base.defaults)) == (None, {"steps": 50, "guidance_scale": 5.0})
    assert (base.native_width, base.native_height, base.size_multiple) == (1024, 1024, 32)
    klein = local_traits(klein_base)
    distilled = local_traits(llm_models["flux2_klein_distilled"])
    assert (klein.guidance, dict(klein.defaults)) == ("cfg", {"steps": 50, "guidance_scale": 4.0})
    assert (distilled.guidance, dict(distilled.defaults)) == ("none", {"steps": 4, "guidance_scale": 0.0})
    assert (distilled.native_width, distilled.size_multiple) == (256, 4)
    qwen = local_traits(llm_models["qwen_image"])
    assert (qwen.guidance, qwen.native_width, qwen.size_multiple) == ("true_cfg", 256, 4)
    assert any("true CFG" in line for line in qwen.describe())


def test_flux2_klein_refuses_what_it_cannot_run(llm_models, ray_address, tmp_path):
    """[klein] distilled: a negative prompt, an init image and a guidance_scale each exit 2 naming the row."""
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    rows = [{"prompt": "a red circle", "negative_prompt": "blurry", "init_image": None, "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": None, "init_image": "init.png", "guidance_scale": None},
            {"prompt": "a red circle", "negative_prompt": None, "init_image": None, "guidance_scale": 3.5},
            {"prompt": "a red circle", "negative_prompt": None, "init_image": None, "guidance_scale": None}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", llm_models["flux2_klein_distilled"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    for row, column in ((0, "negative_prompt"), (1, "init_image"), (2, "guidance_scale")):
        line = next(ln for ln in lines if f"row {row} " in ln and column in ln)
        assert "FLUX.2 [klein]" in line, line
    assert not any("row 3 " in ln for ln in lines) and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.rglob("*.png"))


@pytest.mark.parametrize("name", ["z_image", "qwen_image", "flux2_klein_distilled", "flux2_dev"])
def test_lora_changes_the_image_and_scale_zero_is_no_adapter(llm_models, tmp_path, name):
    """A diffusers/PEFT LoRA on the transformer, loaded per batch like SD's: it changes the
    image, a scale of 0 renders exactly as no adapter, the record holds its sha256, and the same
    adapter in kohya naming renders like it (FLUX.2's in Black Forest Labs' module names, as
    kohya-ss writes FLUX LoRAs, on the modules that naming shares with FLUX.1's)."""
    from integration.families_2026 import ATTENTION_PROJECTIONS
    from integration.model_families import FLUX_LORA_MODULES, build_transformer_lora, flux_to_kohya, to_kohya
    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    lora = build_transformer_lora(llm_models[name], tmp_path / "a.safetensors", seed=1, target_modules=ATTENTION_PROJECTIONS)
    twin = lora  # the PEFT adapter whose kohya twin is checked
    if name.startswith("flux2"):
        twin = build_transformer_lora(llm_models[name], tmp_path / "t.safetensors", seed=2, target_modules=list(FLUX_LORA_MODULES))
        kohya = flux_to_kohya(twin, tmp_path / "k.safetensors")
    else:
        kohya = to_kohya(lora, tmp_path / "k.safetensors", component="transformer")
    gen = load_model(str(llm_models[name]), device="cpu", loras={"a": str(lora), "t": str(twin), "k": str(kohya)})

    guidance = 0.0 if name == "flux2_klein_distilled" else 2.0  # the distilled model takes none

    def render(loras: tuple) -> np.ndarray:
        row = Row(0, "x", "a red circle", "", 1, 2, guidance, 128, 64, "default", strength=0.5, clip_skip=1, loras=loras)
        return gen.generate([row]).pixels[0]

    base, with_a, zero, again = render(()), render((("a", 1.0),)), render((("a", 0.0),)), render(())
    assert np.abs(with_a.astype(int) - base).max() > 10
    assert np.array_equal(zero, base) and np.array_equal(again, base)
    with_twin = with_a if twin == lora else render((("t", 1.0),))
    assert np.abs(with_twin.astype(int) - base).max() > 5
    assert np.abs(render((("k", 1.0),)).astype(int) - with_twin).max() <= 1
    record = gen.facts(Row(0, "x", "p", "", 1, 2, guidance, 128, 64, "default", strength=0.5, clip_skip=1, loras=(("a", 1.0),)))
    assert record.loras[0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["z_image", "qwen_image", "flux2_klein"])
def test_guidance_and_negative_prompt_reach_the_pipeline(llm_models, klein_base, name):
    """What guidance_scale means arrives as the pipeline's own argument: Z-Image's CFG and
    Qwen-Image's true CFG use the row's negative prompt (and are off at 0 / 1, where a row that
    still sets one is refused, not rendered without it); FLUX.2 [klein] base guides against its
    own empty prompt."""
    from sdbatch.models.runtime import load_model

    model = klein_base if name == "flux2_klein" else llm_models[name]
    gen = load_model(str(model), device="cpu")
    off = {"z_image": 0.0, "qwen_image": 1.0, "flux2_klein": 1.0}[name]

    def render(guidance: float, negative: str) -> np.ndarray:
        from sdbatch.data.row import Row

        row = Row(0, "x", "a red circle", negative, 1, 2, guidance, 128, 64, "default", strength=0.5, clip_skip=1, loras=())
        return gen.generate([row]).pixels[0].astype(int)

    # the tiny random encoders condition weakly: any change shows the argument arrived
    guided, unguided = render(4.0, ""), render(off, "")
    assert not np.array_equal(guided, unguided)
    if name != "flux2_klein":
        assert not np.array_equal(render(4.0, "blurry"), guided)
        with pytest.raises(ValueError, match=f"negative_prompt 'blurry' with guidance_scale {off}: .*no unconditional"):
            render(off, "blurry")
