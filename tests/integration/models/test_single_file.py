"""Single-file checkpoints (issue 24): a tiny SD3 transformer written in Stability AI's original
key layout (``model.diffusion_model.joint_blocks…``) loads through diffusers' ``from_single_file``
with the configuration of its diffusers folder (``--model-config``), renders exactly as the
folder does through the CLI, is pinned by its bytes and reproduces; pickle checkpoints, a pickle
under a .safetensors name and a checkpoint without its configuration exit 2 naming the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest

ROWS = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(["a red circle", "a blue square", "a green circle"])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from integration.model_families import build_sd3, sd3_transformer_to_original

    root = tmp_path_factory.mktemp("single-file")
    folder = build_sd3(root / "sd3")
    return {"folder": folder, "file": sd3_transformer_to_original(folder / "transformer", root / "sd3_medium.safetensors")}


@pytest.fixture(scope="module")
def jobs(checkpoint, ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single-file-jobs")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    runs = {"folder": ["--model", checkpoint["folder"]],
            "file": ["--model", checkpoint["file"], "--model-config", checkpoint["folder"]]}
    return submit_jobs(ray_address, manifest, tmp, runs, "--steps", "2")


def test_a_single_file_checkpoint_renders_like_its_folder(jobs):
    folder, file = ({r["id"]: r for r in load_index(jobs[n])} for n in ("folder", "file"))
    for rid in folder:
        assert np.array_equal(stored_pixels(jobs["folder"], folder[rid]), stored_pixels(jobs["file"], file[rid])), rid
    assert folder["r0"]["model_fingerprint"] != file["r0"]["model_fingerprint"]


def test_a_single_file_checkpoint_is_pinned_by_its_bytes_and_reproduces(jobs, checkpoint):
    from sdbatch.models.resolve import preflight

    job = json.loads((jobs["file"] / "_sdbatch" / "job.json").read_text())
    pin = preflight(str(checkpoint["file"]), config=str(checkpoint["folder"])).pin
    assert pin.startswith("single-file:") and json.dumps(job).count(pin) >= 1
    assert_reproduces(jobs["file"], "r1")


def test_single_file_refusals_exit_2_naming_the_fix(checkpoint, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95 a pickle")
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(b"\x80\x04\x95 a pickle under a safetensors name")
    cases = [(["--model", pickle, "--model-config", checkpoint["folder"]], "pickle checkpoint"),
             (["--model", disguised, "--model-config", checkpoint["folder"]], "not a safetensors file"),
             (["--model", checkpoint["file"]], "set model.config (--model-config)"),
             (["--model-config", checkpoint["folder"]], "model.config is only for a single-file")]
    assert_refused(ray_address, manifest, tmp_path / "out", cases)
