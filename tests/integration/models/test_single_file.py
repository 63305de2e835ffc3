"""Single-file checkpoints (issue 24): tiny pipelines written in their original key layouts load
through diffusers' ``from_single_file`` with the configuration of their diffusers folder
(``--model-config``) and render exactly as the folder does through the CLI — an SD3 transformer
in Stability AI's layout (``model.diffusion_model.joint_blocks…``), and whole SD 1.x and SDXL
pipelines as AUTOMATIC1111 keeps them (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*`` / ``conditioner.embedders.0/1.*``); each is pinned by its
bytes and reproduces. Pickle checkpoints, a pickle under a .safetensors name, a checkpoint
without its configuration exit 2 naming the fix. A tiny FLUX.1 transformer in Black Forest Labs'
layout (``double_blocks.N.img_attn.qkv…``), which diffusers' converter cannot split (it assumes
FLUX.1's width, 3072), is refused as a bad input naming it; with that split made width-aware
(test-only), it loads through the package's loader as exactly its folder's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest

ROWS = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(["a red circle", "a blue square", "a green circle"])]


#: the single-file checkpoints beside their folders: SD3's transformer, whole SD 1.x and SDXL pipelines
FAMILIES = ("sd3", "sd15", "sdxl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from integration import model_families as built

    root = tmp_path_factory.mktemp("single-file")
    sd3, sd15, flux = built.build_sd3(root / "sd3"), built.build_sd(root / "sd15"), built.build_flux(root / "flux-dev")
    sdxl = built.build_sdxl(root / "sdxl", width_2=64)  # two encoders of one width are one to diffusers' single-file loader
    return {"sd3": {"folder": sd3, "file": built.sd3_transformer_to_original(sd3 / "transformer", root / "sd3_medium.safetensors")},
            "sd15": {"folder": sd15, "file": built.sd_pipeline_to_original(sd15, root / "v1-5-pruned.safetensors")},
            "sdxl": {"folder": sdxl, "file": built.sd_pipeline_to_original(sdxl, root / "sd_xl_base_1.0.safetensors")},
            "flux": {"folder": flux, "file": built.flux_transformer_to_original(flux / "transformer", root / "flux1-dev.safetensors")}}


@pytest.fixture(scope="module")
def jobs(checkpoint, ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single-file-jobs")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    runs = {}
    for family in FAMILIES:
        folder, file = checkpoint[family]["folder"], checkpoint[family]["file"]
        runs |= {f"{family}-folder": ["--model", folder], f"{family}-file": ["--model", file, "--model-config", folder]}
    return submit_jobs(ray_address, manifest, tmp, runs, "--steps", "2")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_single_file_checkpoint_renders_like_its_folder(jobs, family):
    folder_job, file_job = jobs[f"{family}-folder"], jobs[f"{family}-file"]
    folder, file = ({r["id"]: r for r in load_index(job)} for job in (folder_job, file_job))
    assert folder.keys() == file.keys() == {r["id"] for r in ROWS}
    for rid in folder:  # the same tensors, renamed and restacked: the same bytes
        assert np.array_equal(stored_pixels(folder_job, folder[rid]), stored_pixels(file_job, file[rid])), rid
    assert folder["r0"]["model_fingerprint"] != file["r0"]["model_fingerprint"]


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_a_single_file_checkpoint_is_pinned_by_its_bytes_and_reproduces(jobs, checkpoint, family):
    from sdbatch.models.resolve import preflight

    job = json.loads((jobs[f"{family}-file"] / "_sdbatch" / "job.json").read_text())
    pin = preflight(str(checkpoint[family]["file"]), config=str(checkpoint[family]["folder"])).pin
    assert pin.startswith("single-file:") and json.dumps(job).count(pin) >= 1
    assert_reproduces(jobs[f"{family}-file"], "r1")


def test_single_file_refusals_exit_2_naming_the_fix(checkpoint, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 a pickle")
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(b"\x80\x04\x95 a pickle under a safetensors name")
    sd3 = checkpoint["sd3"]
    cases = [(["--model", pickle, "--model-config", sd3["folder"]], "pickle checkpoint"),
             (["--model", disguised, "--model-config", sd3["folder"]], "not a safetensors file"),
             (["--model", sd3["file"]], "set model.config (--model-config)"),
             (["--model-config", sd3["folder"]], "model.config is only for a single-file")]
    assert_refused(ray_address, manifest, tmp_path / "out", cases)


def test_a_flux_transformer_diffusers_cannot_convert_is_refused_naming_why(checkpoint, run_cli, tmp_path):
    # diffusers 0.42's convert_flux_transformer_checkpoint_to_diffusers splits each single block's
    # stacked linear1 at FLUX.1's width (3 × 3072 + 4 × 3072): a tiny one's (3 × 32 + 128) cannot be
    # split, and a FLUX.1 that wide is ~0.5B parameters, too big to render here. So the BFL-layout
    # file is tested up to diffusers' converter, and what a job does with it: its first worker
    # finds the bad input (a ModelError naming the fix, not a RuntimeError) and the job exits 2 with
    # the whole message at once, starting no other worker to meet it again
    flux = checkpoint["flux"]
    out = tmp_path / "out"
    result = run_cli("submit", write_manifest(tmp_path / "m.parquet", ROWS[:1]), "--out", out,
                     "--model", flux["file"], "--model-config", flux["folder"], "--steps", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert ("a worker could not start: model " in result.stderr and "the single-file checkpoint does not load with "
            "model.config 'flux-dev''s configuration (is model.config a folder of the same architecture?): RuntimeError: "
            "split_with_sizes expects split_sizes to sum exactly to 224 (input tensor's size at dimension 0), but got "
            "split_sizes=[3072, 3072, 3072, 12288]") in " ".join(result.stderr.split()), result.stderr
    assert not list(out.rglob("*.png"))


def _flux_converter_at_any_width(convert):
    """diffusers' FLUX.1 converter made to split a single block's stacked ``linear1`` at the
    file's own width (the width of ``img_in``) instead of FLUX.1's 3072: each part zero-padded to
    FLUX.1's size for ``convert``, cut back after. Test-only: it lets the tiny BFL-layout file go
    through diffusers' own renames, to prove the writer and the loader beside it."""
    full = 3072

    def at_any_width(checkpoint, **kwargs):
        width = checkpoint["img_in.weight"].shape[0]
        blocks = {k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k}
        for key in blocks:
            q, k, v, mlp = checkpoint[key].split([width, width, width, 4 * width])
            padded = [torch.nn.functional.pad(t, (0, 0) * (t.ndim - 1) + (0, size - len(t)))
                      for t, size in zip((q, k, v, mlp), (full, full, full, 4 * full))]
            checkpoint[key] = torch.cat(padded)
        converted = convert(checkpoint, **kwargs)
        cut = {".attn.to_q.": width, ".attn.to_k.": width, ".attn.to_v.": width, ".proj_mlp.": 4 * width}
        return {key: next((t[:n] for part, n in cut.items() if key.startswith("single_") and part in key), t)
                for key, t in converted.items()}

    return at_any_width


def test_a_flux_transformer_in_bfl_layout_loads_as_its_folder_at_any_width(checkpoint, monkeypatch):
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from safetensors.torch import load_file

    from sdbatch.models.runtime import load_model

    mapping = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    monkeypatch.setitem(mapping, "checkpoint_mapping_fn", _flux_converter_at_any_width(mapping["checkpoint_mapping_fn"]))
    flux = checkpoint["flux"]
    assert any(k.startswith("double_blocks.0.img_attn.qkv.") for k in load_file(flux["file"]))  # BFL's names
    loaded = load_model(str(flux["file"]), config=str(flux["folder"]), device="cpu", dtype="float32")
    own = load_file(flux["folder"] / "transformer" / "diffusion_pytorch_model.safetensors")
    from_file = loaded.txt2img.transformer.state_dict()
    assert own.keys() == from_file.keys()
    assert all(torch.equal(own[k], from_file[k]) for k in own), [k for k in own if not torch.equal(own[k], from_file[k])]
