"""A VAE override (issue 26): ``model.vae`` (``--vae``), a diffusers AutoencoderKL folder,
decodes in place of the model's own VAE — the image changes —, is pinned with the model (the
fingerprint, ``job.json`` and each image's model hash change with its bytes) and reproduces;
a folder that is no VAE of the model's class exits 2 naming the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest

from sdbatch.models.builtin import resolve_builtin

ROWS = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(["a red circle", "a blue square"])]


def build_vae(folder, *, scale: float):
    """builtin:tiny's own VAE with its decoder's last convolution scaled: the same class and
    shapes, other pixels."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(resolve_builtin("builtin:tiny") / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(scale)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def jobs(ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    vae = build_vae(tmp / "vae-folder", scale=-1.0)
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    runs = {"own": [], "vae": ["--vae", vae]}
    return {"vae_folder": vae, **submit_jobs(ray_address, manifest, tmp, runs, "--model", "builtin:tiny", "--steps", "2")}


def test_a_vae_override_changes_the_image_and_is_pinned(jobs):
    from sdbatch.models.resolve import preflight

    own, vae = ({r["id"]: r for r in load_index(jobs[n])} for n in ("own", "vae"))
    for rid in own:
        assert not np.array_equal(stored_pixels(jobs["own"], own[rid]), stored_pixels(jobs["vae"], vae[rid])), rid
    pin = preflight("builtin:tiny", vae=str(jobs["vae_folder"])).pin
    assert pin.startswith("vae:") and pin != preflight("builtin:tiny").pin
    job = json.loads((jobs["vae"] / "_sdbatch" / "job.json").read_text())
    assert job["model"]["fingerprint"] == pin and job["spec"]["model"]["vae"] == str(jobs["vae_folder"])
    assert vae["r0"]["model_fingerprint"] == pin != own["r0"]["model_fingerprint"]


def test_a_changed_vae_changes_the_pin(jobs, tmp_path):
    from sdbatch.models.resolve import preflight

    other = build_vae(tmp_path / "vae", scale=-0.5)
    assert preflight("builtin:tiny", vae=str(other)).pin != preflight("builtin:tiny", vae=str(jobs["vae_folder"])).pin


def test_a_vae_override_reproduces(jobs):
    assert_reproduces(jobs["vae"], "r1")


def test_a_folder_that_is_no_vae_of_the_model_exits_2(jobs, ray_address, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    text_encoder = resolve_builtin("builtin:tiny") / "text_encoder"
    cases = [(["--model", "builtin:tiny", "--vae", tmp_path / "missing"], "no config.json there"),
             (["--model", "builtin:tiny", "--vae", text_encoder], "takes a AutoencoderKL folder")]
    assert_refused(ray_address, manifest, tmp_path / "out", cases)
