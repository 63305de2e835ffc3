"""GGUF single-file transformers (issue 24): tiny Qwen-Image, FLUX.1 [dev], Z-Image and FLUX.2
[dev] transformers written as GGUF files with the ``gguf`` package's writer — every tensor F32, or its
matrices Q8_0/F16 as published GGUFs hold them; Z-Image's in Alibaba's original key layout
and FLUX.2's in Black Forest Labs' (fused qkv), which diffusers converts as it loads — load through diffusers' ``from_single_file``
with ``GGUFQuantizationConfig`` and the configuration of their diffusers folder
(``--model-config``): F32 renders exactly as the folder does, Q8_0 within its rounding; a CLI
job runs, records the quantized transformer, is pinned by the file's bytes and reproduces; a
file that is not GGUF and a GGUF without its configuration exit 2 naming the fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

#: family -> (its folder's builder, the key layout its published GGUFs use, Q8_0's largest rounding
#: in uint8 levels). FLUX.1's GGUFs keep Black Forest Labs' names, but diffusers' conversion of
#: that layout assumes FLUX.1's full width (3072), so the tiny one is written in diffusers' names.
GGUF_FAMILIES = {
    "qwen_image": ("families_2026.build_qwen_image", None, 2),
    "flux1_dev": ("model_families.build_flux", None, 2),
    "z_image": ("families_2026.build_z_image", "z_image_to_original", 4),
    "flux2_dev": ("families_2026.build_flux2_dev", "flux2_to_original", 2),
}


@pytest.fixture(scope="module")
def gguf_sets(tmp_path_factory):
    """name -> its diffusers folder and its transformer as F32 and Q8_0 GGUF files, built on first use."""
    import importlib

    from integration.families_2026 import write_gguf

    built: dict[str, dict] = {}

    def build(name: str) -> dict:
        if name not in built:
            builder, layout, _ = GGUF_FAMILIES[name]
            module, function = builder.rsplit(".", 1)
            root = tmp_path_factory.mktemp(f"gguf-{name}")
            folder = getattr(importlib.import_module(f"integration.{module}"), function)(root / name)
            to_layout = getattr(importlib.import_module("integration.families_2026"), layout) if layout else None
            built[name] = {"folder": folder, **{
                kind: write_gguf(folder / "transformer", root / f"{name}-{kind.upper()}.gguf", quantized=kind == "q8_0",
                                 layout=to_layout) for kind in ("f32", "q8_0")}}
        return built[name]

    return build


@pytest.fixture(scope="module")
def gguf_files(gguf_sets):
    return gguf_sets("qwen_image")


@pytest.mark.parametrize("name", list(GGUF_FAMILIES))
def test_a_gguf_transformer_renders_like_its_folder(gguf_sets, name):
    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    files = gguf_sets(name)
    row = Row(0, "r0", "a red circle", "", 1, 2, 2.0, 128, 64, "default", strength=0.5, clip_skip=1, loras=())
    folder = str(files["folder"])
    rendered, infos = {}, {}
    for kind, model, config in (("folder", folder, None), ("f32", files["f32"], folder), ("q8", files["q8_0"], folder)):
        gen = load_model(str(model), config=config, device="cpu")
        rendered[kind], infos[kind] = gen.generate([row]).pixels[0].astype(int), gen.info
    assert np.array_equal(rendered["f32"], rendered["folder"])  # the same numbers, through the GGUF loader
    q8_error = np.abs(rendered["q8"] - rendered["folder"])
    assert 0 < q8_error.max() <= GGUF_FAMILIES[name][2], q8_error.max()  # quantized: its rounding shows, no more
    assert rendered["folder"].std() > 5
    assert infos["folder"].versions.get("quantized") is None
    assert infos["f32"].versions["quantized"] == infos["q8"].versions["quantized"] == "transformer: gguf"
    pins = {kind: info.fingerprint for kind, info in infos.items()}
    assert len(set(pins.values())) == 3 and pins["q8"].startswith("single-file:")


def test_a_gguf_job_runs_through_the_cli_is_pinned_and_reproduces(gguf_files, ray_address, tmp_path):
    from sdbatch.audit.reproduce import reproduce_row
    from sdbatch.models.resolve import preflight
    from sdbatch.output.encode import read_embedded

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "t0", "prompt": "a red circle", "seed": 1, "init_image": None},
                                                       {"id": "i0", "prompt": "a blue square", "seed": 2, "init_image": "init.png"}])
    out = tmp_path / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", gguf_files["q8_0"], "--model-config",
                 gguf_files["folder"], "--steps", "2", "--width", "128", "--height", "64", "--set", "defaults.strength=0.5")
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    assert {r["status"] for r in index.values()} == {"ok"} and set(index) == {"t0", "i0"}
    _, record = read_embedded((out / index["i0"]["key"]).read_bytes())
    assert record["versions"]["quantized"] == "transformer: gguf"
    pin = preflight(str(gguf_files["q8_0"]), config=str(gguf_files["folder"])).pin
    job = json.loads((out / "_sdbatch" / "job.json").read_text())
    assert pin.startswith("single-file:") and json.dumps(job).count(pin) >= 1
    assert np.asarray(Image.open(io.BytesIO((out / index["t0"]["key"]).read_bytes()))).std() > 5
    reproduced = reproduce_row(str(out), "t0")
    assert reproduced.match, (reproduced.summary(), reproduced.notes)


def test_gguf_refusals_exit_2_naming_the_fix(gguf_files, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "t0", "prompt": "a red circle", "seed": 1}])
    fake = tmp_path / "flux1-dev-Q8_0.gguf"
    fake.write_bytes(b"\x80\x04\x95 a pickle under a gguf name")
    cases = [(["--model", fake, "--model-config", gguf_files["folder"]], "not a GGUF file"),
             (["--model", gguf_files["q8_0"]], "set model.config (--model-config)")]
    for args, message in cases:
        result = cli(ray_address, "submit", manifest, "--out", tmp_path / "out", "--dry-run", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
