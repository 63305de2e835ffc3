"""Memory options for the big models (issue 24, item 6) on a tiny FLUX.1 [dev]:

- a pre-quantized diffusers folder — its transformer quantized with torchao (int8 weight-only)
  and saved with ``save_pretrained`` as safetensors — renders through a CLI job within a level of
  the unquantized folder, each record naming the quantization and torchao's version, and
  reproduces byte for byte; bitsandbytes (diffusers loads it on a GPU only: its folder is written
  as config only here), a torchao folder saved as pickle and a method sdbatch does not load exit 2
  at submit naming the folder, the method and the fix;
- ``model.text_encoder_device=cpu`` keeps the text encoders on the CPU and the rest on the
  model's device (both the CPU here: the split itself needs a GPU), renders the same bytes as
  without it, is recorded and reproduces; with ``model.offload``, a model without text encoder
  or a bitsandbytes text encoder (GPU only) it exits 2."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from importlib.util import find_spec

import numpy as np
import pytest
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest

ROWS = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(["a red circle", "a blue square"])]
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}


def _with_component(folder, copy, component, quantization_config):
    """A copy of ``folder`` whose ``component``'s config.json says it is quantized (its weights left as they are)."""
    shutil.copytree(folder, copy)
    config = json.loads((copy / component / "config.json").read_text())
    (copy / component / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return copy


def _with_transformer(folder, copy, save):
    """A copy of ``folder`` whose transformer is written anew by ``save``."""
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "transformer")
    save(copy / "transformer")
    return copy


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import torch
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    from integration.model_families import build_flux

    root = tmp_path_factory.mktemp("memory")
    folder = build_flux(root / "flux")
    quantized = FluxTransformer2DModel.from_pretrained(
        folder, subfolder="transformer", torch_dtype=torch.float32, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    return {
        "plain": folder,
        "torchao": _with_transformer(folder, root / "flux-torchao", save=quantized.save_pretrained),
        "torchao_pickle": _with_transformer(folder, root / "flux-torchao-bin", save=lambda to: quantized.save_pretrained(to, safe_serialization=False)),
        "bnb": _with_component(folder, root / "flux-bnb-nf4", "transformer", BNB_4BIT),
        "bnb_t5": _with_component(folder, root / "flux-bnb-t5", "text_encoder_2", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
        "quanto": _with_component(folder, root / "flux-quanto", "transformer", {"quant_method": "quanto", "weights_dtype": "int8"}),
    }


@pytest.fixture(scope="module")
def jobs(folders, ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory-jobs")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    runs = {
        "plain": ["--model", folders["plain"]],
        "torchao": ["--model", folders["torchao"]],
        "encoders_on_cpu": ["--model", folders["plain"], "--set", "model.text_encoder_device=cpu"],
    }
    return submit_jobs(ray_address, manifest, tmp, runs, "--steps", "2", "--width", "64", "--height", "64")


def _records(out):
    from sdbatch.output.encode import read_embedded

    return {r["id"]: (r, read_embedded((out / r["key"]).read_bytes())[1]) for r in load_index(out)}


def test_a_torchao_folder_renders_records_its_quantization_and_reproduces(jobs):
    plain, torchao = _records(jobs["plain"]), _records(jobs["torchao"])
    assert set(torchao) == {"r0", "r1"} and {r["status"] for r, _ in torchao.values()} == {"ok"}
    for rid in plain:
        ours, theirs = (stored_pixels(jobs[n], rows[rid][0]).astype(int) for n, rows in (("torchao", torchao), ("plain", plain)))
        assert 0 < np.abs(ours - theirs).max() <= 2 and theirs.std() > 5, rid  # int8 rounding shows, no more
    versions = torchao["r0"][1]["versions"]
    assert versions["quantized"] == "transformer: torchao Int8WeightOnlyConfig (8-bit)"
    assert versions["torchao"] == importlib.metadata.version("torchao")
    assert "quantized" not in plain["r0"][1]["versions"]
    assert torchao["r0"][0]["model_fingerprint"] != plain["r0"][0]["model_fingerprint"]
    assert_reproduces(jobs["torchao"], "r1")


def test_text_encoders_on_the_cpu_render_the_same_bytes_and_are_recorded(jobs):
    plain, split = _records(jobs["plain"]), _records(jobs["encoders_on_cpu"])
    for rid in plain:
        assert np.array_equal(stored_pixels(jobs["plain"], plain[rid][0]), stored_pixels(jobs["encoders_on_cpu"], split[rid][0]))
    assert split["r0"][1]["versions"]["text_encoder_device"] == "cpu"
    assert "text_encoder_device" not in plain["r0"][1]["versions"]
    job = json.loads((jobs["encoders_on_cpu"] / "_sdbatch" / "job.json").read_text())
    assert '"text_encoder_device": "cpu"' in json.dumps(job)
    assert_reproduces(jobs["encoders_on_cpu"], "r0")


def test_the_modules_devices_after_load(folders):
    from sdbatch.models.runtime import load_model

    pipe = load_model(str(folders["plain"]), device="cpu", text_encoder_device="cpu").txt2img
    devices = {name: module.device.type for name, module in pipe.components.items() if hasattr(module, "device")}
    assert devices == dict.fromkeys(("text_encoder", "text_encoder_2", "transformer", "vae"), "cpu")


def test_prompts_are_encoded_where_the_encoders_are_and_handed_over(tmp_path):
    """Qwen-Image's pipeline moves its tokens to the device it computes on (diffusers 0.42; FLUX.1's
    asks its encoders where they are): asked for embeddings on another device — the GPU on a GPU
    worker, "meta" here, where there is none — its encoder reads its tokens on the CPU it is kept
    on only with the option, and the embeddings come back on the device asked for."""
    import contextlib

    import torch

    from integration.families_2026 import build_qwen_image
    from sdbatch.models.runtime import load_model

    folder = str(build_qwen_image(tmp_path / "qwen"))
    seen: list[str] = []
    for option, read_on in (("cpu", "cpu"), ("same", "meta")):
        pipe = load_model(folder, device="cpu", text_encoder_device=option).txt2img
        seen.clear()
        pipe.text_encoder.register_forward_pre_hook(
            lambda _, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).device.type), with_kwargs=True
        )
        with contextlib.suppress(NotImplementedError) if option == "same" else contextlib.nullcontext():
            embeds, _ = pipe.encode_prompt(["a red circle"], device=torch.device("meta"))
            assert embeds.device.type == "meta"
        assert seen == [read_on], option  # without the option the encoder reads meta tokens: no data, it fails


def test_what_cannot_load_is_refused_before_any_worker_starts(folders, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    bnb = str(folders["bnb"])
    cases = [
        (["--model", bnb], f"model {bnb!r}: its transformer (bitsandbytes 4-bit nf4) loads on a CUDA GPU only"),
        (["--model", folders["torchao_pickle"]], "contains pickle checkpoint files (transformer/diffusion_pytorch_model.bin)"),
        (["--model", folders["quanto"]], "its transformer is saved quantized by 'quanto', which sdbatch does not load"),
        (
            ["--model", folders["plain"], "--set", "model.text_encoder_device=cpu", "--set", "model.offload=model", "--set", "model.device=cuda"],
            "model.offload=model already moves the text encoders",
        ),
        (["--model", "builtin:null", "--set", "model.text_encoder_device=cpu"], "which has no text encoder"),
        (
            ["--model", folders["bnb_t5"], "--set", "model.text_encoder_device=cpu", "--set", "resources.gpus_per_worker=1"],
            "its text_encoder_2 (bitsandbytes 8-bit) loads on a CUDA GPU only, and model.text_encoder_device=cpu would keep it",
        ),
    ]
    if find_spec("bitsandbytes") is None:  # on GPU workers, the package is what is missing
        cases.append(
            (["--model", bnb, "--set", "resources.gpus_per_worker=1"], "needs the bitsandbytes package >= 0.43.3 to load, and it is not installed: pip install")
        )
    assert_refused(ray_address, manifest, tmp_path / "out", cases)
    assert not (tmp_path / "out").exists()
