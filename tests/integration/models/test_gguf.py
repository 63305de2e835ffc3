"""GGUF single-file transformers (issue 24): a tiny Qwen-Image transformer written as a GGUF file
with the ``gguf`` package's writer — every tensor F32, or its matrices Q8_0/F16 as published
GGUFs hold them — loads through diffusers' ``from_single_file`` with ``GGUFQuantizationConfig``
and the configuration of its diffusers folder (``--model-config``): F32 renders exactly as the
folder does, Q8_0 within its rounding; a CLI job runs, records the quantized transformer, is
pinned by the file's bytes and reproduces; a file that is not GGUF and a GGUF without its
configuration exit 2 naming the fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from integration.families_2026 import build_qwen_image, write_gguf

    root = tmp_path_factory.mktemp("gguf")
    folder = build_qwen_image(root / "qwen_image")
    return {"folder": folder, "f32": write_gguf(folder / "transformer", root / "qwen-image-F32.gguf", quantized=False),
            "q8": write_gguf(folder / "transformer", root / "qwen-image-Q8_0.gguf", quantized=True)}


def test_a_gguf_transformer_renders_like_its_folder(gguf_files):
    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    row = Row(0, "r0", "a red circle", "", 1, 2, 2.0, 128, 64, "default", strength=0.5, clip_skip=1, loras=())
    folder = str(gguf_files["folder"])
    rendered, infos = {}, {}
    for name, model, config in (("folder", folder, None), ("f32", gguf_files["f32"], folder), ("q8", gguf_files["q8"], folder)):
        gen = load_model(str(model), config=config, device="cpu")
        rendered[name], infos[name] = gen.generate([row]).pixels[0].astype(int), gen.info
    assert np.array_equal(rendered["f32"], rendered["folder"])  # the same numbers, through the GGUF loader
    q8_error = np.abs(rendered["q8"] - rendered["folder"])
    assert 0 < q8_error.max() <= 2, q8_error.max()  # quantized: its rounding shows, no more
    assert infos["folder"].versions.get("quantized") is None
    assert infos["f32"].versions["quantized"] == infos["q8"].versions["quantized"] == "transformer: gguf"
    pins = {name: info.fingerprint for name, info in infos.items()}
    assert len(set(pins.values())) == 3 and pins["q8"].startswith("single-file:")


def test_a_gguf_job_runs_through_the_cli_is_pinned_and_reproduces(gguf_files, ray_address, tmp_path):
    from sdbatch.audit.reproduce import reproduce_row
    from sdbatch.models.resolve import preflight
    from sdbatch.output.encode import read_embedded

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "t0", "prompt": "a red circle", "seed": 1, "init_image": None},
                                                       {"id": "i0", "prompt": "a blue square", "seed": 2, "init_image": "init.png"}])
    out = tmp_path / "out"
    result = cli(ray_address, "submit", manifest, "--out", out, "--model", gguf_files["q8"], "--model-config",
                 gguf_files["folder"], "--steps", "2", "--width", "128", "--height", "64", "--set", "defaults.strength=0.5")
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    assert {r["status"] for r in index.values()} == {"ok"} and set(index) == {"t0", "i0"}
    _, record = read_embedded((out / index["i0"]["key"]).read_bytes())
    assert record["versions"]["quantized"] == "transformer: gguf"
    pin = preflight(str(gguf_files["q8"]), config=str(gguf_files["folder"])).pin
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
             (["--model", gguf_files["q8"]], "set model.config (--model-config)")]
    for args, message in cases:
        result = cli(ray_address, "submit", manifest, "--out", tmp_path / "out", "--dry-run", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
