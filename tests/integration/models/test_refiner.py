"""The SDXL refiner (``model.refiner``, per-row ``refiner_switch``; issue 14) through the CLI, on
a tiny random-weight SDXL base and refiner built from configs: one job, many checks; and the
refusals, which all stop before any worker starts."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image
from typer.testing import CliRunner

from sdbatch.cli.app import app
from sdbatch.output.encode import parse_infotext, read_embedded


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    from integration.model_families import build_sdxl, build_sdxl_refiner

    root = tmp_path_factory.mktemp("sdxl-pair")
    base = build_sdxl(root / "sdxl")
    return base, build_sdxl_refiner(root / "refiner", base)


@pytest.fixture(scope="module")
def refiner_job(sdxl_pair, ray_address, tmp_path_factory):
    base, refiner = sdxl_pair
    tmp = tmp_path_factory.mktemp("refiner-job")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "init.png")
    rows = [  # refiner_switch null: the job default (0.8)
        {"id": "d1", "prompt": "a red circle", "seed": 1, "refiner_switch": None, "init_image": None},
        {"id": "h1", "prompt": "a red circle", "seed": 1, "refiner_switch": 0.5, "init_image": None},
        {"id": "d2", "prompt": "a blue square", "seed": 2, "refiner_switch": None, "init_image": None},
        {"id": "i1", "prompt": "a green circle", "seed": 3, "refiner_switch": 0.5, "init_image": "init.png"},
    ]
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    args = ("submit", manifest, "--out", out, "--model", base, "--refiner", refiner, "--steps", "4",
            "--width", "64", "--height", "64", "--batch-size", "4")
    result = cli(ray_address, *args)
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in load_index(out)}
    data = {rid: (out / r["key"]).read_bytes() for rid, r in index.items()}
    return {"out": out, "index": index, "data": data, "args": args, "refiner": refiner}


def test_refiner_rows_recorded_in_index_record_and_infotext(refiner_job):
    from sdbatch.models.pins import fingerprint_model_dir

    index, refiner = refiner_job["index"], refiner_job["refiner"]
    pin = fingerprint_model_dir(refiner)
    assert {r["status"] for r in index.values()} == {"ok"}
    assert {rid: r["refiner_switch"] for rid, r in index.items()} == {"d1": 0.8, "h1": 0.5, "d2": 0.8, "i1": 0.5}
    assert {r["refiner_fingerprint"] for r in index.values()} == {pin}
    assert set(index["d1"]["batch_rows"]) == {"d1", "d2"}  # the switch is part of the batch key
    text, record = read_embedded(refiner_job["data"]["h1"])
    assert (record["refiner_name"], record["refiner_fingerprint"], record["refiner_switch"]) == (str(refiner), pin, 0.5)
    assert f"Refiner: {refiner} [{pin[:10]}], Refiner switch at: 0.5" in text  # A1111's keys, in its order
    assert parse_infotext(text)["refiner_switch"] == 0.5
    from sd_parsers import ParserManager

    info = ParserManager().parse(Image.open(io.BytesIO(refiner_job["data"]["d1"])))
    assert "Refiner switch at: 0.8" in info.raw_parameters["parameters"]
    job = json.loads((refiner_job["out"] / "_sdbatch" / "job.json").read_text())
    assert job["refiner"] == {"name": str(refiner), "fingerprint": pin}


def test_refiner_switch_changes_the_image(refiner_job):
    d1, h1 = (np.asarray(Image.open(io.BytesIO(refiner_job["data"][rid]))) for rid in ("d1", "h1"))
    assert d1.shape == (64, 64, 3) and np.abs(d1.astype(int) - h1).max() > 10


def test_refined_rows_reproduce_byte_identical(refiner_job):
    from sdbatch.audit.reproduce import reproduce_row

    for rid in ("h1", "i1"):
        result = reproduce_row(str(refiner_job["out"]), rid)
        assert result.match, (rid, result.summary(), result.notes)


def test_resume_refused_after_the_refiner_changed(refiner_job, ray_address):
    refiner = refiner_job["refiner"]
    config = refiner / "scheduler" / "scheduler_config.json"
    kept = config.read_bytes()
    config.write_text(json.dumps({**json.loads(kept), "steps_offset": 0}))
    try:
        result = cli(ray_address, *refiner_job["args"])
    finally:
        config.write_bytes(kept)
    assert result.returncode == 2, result.stderr
    assert "the refiner" in result.stderr and "pinned" in result.stderr and str(refiner) in result.stderr


# ---------------------------------------------------------------------------------------------
# refusals: exit 2 before any worker starts, nothing written

def submit(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["submit", *map(str, args)])
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def test_refiner_refusals_exit_2(sdxl_pair, tmp_path):
    base, refiner = sdxl_pair
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle", "refiner_switch": None},
                                                       {"prompt": "a red circle", "refiner_switch": 0.7}])
    out = tmp_path / "out"
    code, text = submit(manifest, "--out", out, "--model", base)  # a switch, but no refiner
    assert code == 2 and "row 1" in text and "column 'refiner_switch'" in text and "0.7" in text, text
    assert "--refiner PATH" in text and "row 0" not in text
    code, text = submit(manifest, "--out", out, "--model", "builtin:tiny", "--refiner", refiner)
    assert code == 2 and "takes no refiner" in text and "SDXL (StableDiffusionXLPipeline)" in text, text
    code, text = submit(manifest, "--out", out, "--model", base, "--refiner", base)  # a base, not a refiner
    assert code == 2 and "'StableDiffusionXLPipeline'" in text and "StableDiffusionXLImg2ImgPipeline" in text, text
    bad = write_manifest(tmp_path / "bad.parquet", [{"prompt": "a", "refiner_switch": 1.0},
                                                    {"prompt": "b", "refiner_switch": 0.0},
                                                    {"prompt": "c", "refiner_switch": 0.3}])
    code, text = submit(bad, "--out", out, "--model", base, "--refiner", refiner)
    assert code == 2 and "row 0" in text and "row 1" in text and "row 2" not in text, text
    assert "0 < refiner_switch < 1" in text and "such as 0.8" in text
    code, text = submit(manifest, "--out", out, "--model", base, "--refiner", refiner, "--refiner-switch", "1")
    assert code == 2 and "defaults.refiner_switch" in text, text
    assert not out.exists() or not any(out.rglob("*"))


def test_refiner_folder_with_pickles_is_refused(sdxl_pair, tmp_path):
    base, refiner = sdxl_pair
    copy = shutil.copytree(refiner, tmp_path / "refiner")
    (copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle"}])
    code, text = submit(manifest, "--out", tmp_path / "out", "--model", base, "--refiner", copy)
    assert code == 2 and "pickle" in text and "diffusion_pytorch_model.bin" in text, text


def test_a_worker_that_loaded_another_refiner_gets_no_shard():
    from sdbatch.output.documents import JobRecord, ModelPin
    from sdbatch.run.driver import WorkerStartError, check_worker_model

    job = JobRecord.model_construct(model=ModelPin(name="m", fingerprint="f" * 64),
                                    refiner=ModelPin(name="s3://b/r", fingerprint="s3-etags:aaa"))
    check_worker_model({"worker": "w", "model_pin": "f" * 64, "refiner_pin": "s3-etags:aaa"}, job)
    with pytest.raises(WorkerStartError, match="the refiner changed since"):
        check_worker_model({"worker": "w", "model_pin": "f" * 64, "refiner_pin": "s3-etags:bbb"}, job)


def _with_unet_config(refiner, copy, quantization_config):
    """A copy of the refiner folder whose unet's config.json says it is quantized (its weights left as they are)."""
    shutil.copytree(refiner, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return copy


def test_a_quantized_refiner_is_checked_as_the_model_is(sdxl_pair, tmp_path):
    """A pre-quantized refiner folder (models.quantized) is checked at submit exactly as the model
    is, exit 2 before any worker starts, and again on the worker before anything loads; a torchao
    one loads, and each image's versions name its quantized unet."""
    import torch
    from diffusers import TorchAoConfig, UNet2DConditionModel
    from torchao.quantization import Int8WeightOnlyConfig

    from sdbatch.models.errors import ModelError
    from sdbatch.models.runtime import load_model

    base, refiner = sdxl_pair
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle"}])
    out = tmp_path / "out"
    bnb = _with_unet_config(refiner, tmp_path / "refiner-bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                                "bnb_4bit_quant_type": "nf4"})
    quanto = _with_unet_config(refiner, tmp_path / "refiner-quanto", {"quant_method": "quanto", "weights_dtype": "int8"})
    code, text = submit(manifest, "--out", out, "--model", base, "--refiner", bnb)
    assert code == 2 and f"model {str(bnb)!r}: its unet (bitsandbytes 4-bit nf4) loads on a CUDA GPU only" in text, text
    assert "this job's workers have none (resources.gpus_per_worker=0" in text and "Traceback" not in text, text
    code, text = submit(manifest, "--out", out, "--model", base, "--refiner", quanto)
    assert code == 2 and f"model {str(quanto)!r}: its unet is saved quantized by 'quanto', which sdbatch does not load" in text, text
    assert not out.exists() or not any(out.rglob("*"))
    with pytest.raises(ModelError, match=r"its unet \(bitsandbytes 4-bit nf4\) loads on a CUDA GPU only .*, and this worker runs on cpu: give workers a GPU"):
        load_model(str(base), device="cpu", refiner=str(bnb))
    torchao = shutil.copytree(refiner, tmp_path / "refiner-torchao", ignore=shutil.ignore_patterns("unet"))
    UNet2DConditionModel.from_pretrained(refiner, subfolder="unet", torch_dtype=torch.float32,
                                         quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(torchao / "unet")
    info = load_model(str(base), device="cpu", refiner=str(torchao)).info
    assert info.versions["quantized"] == "refiner unet: torchao Int8WeightOnlyConfig (8-bit)", info.versions
