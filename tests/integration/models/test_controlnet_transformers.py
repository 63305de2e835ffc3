"""ControlNet rows on FLUX.1 and SD3 (issue 26 item 4): the same spec ``controlnets`` and row
columns as SD's, run through ``FluxControlNetPipeline`` / ``StableDiffusion3ControlNetPipeline``
with tiny random one-block ControlNets built from each tiny model's transformer config. Per
family, one job: a ControlNet row differs from the same row without it and with another control
image; scale 0 renders as no ControlNet (the control image's VAE latents are its posterior mean,
so nothing draws from the rows' generators); two ControlNets run in one row; rows reproduce byte
for byte. A ControlNet that does not fit the transformer, is another family's or a union one exits 2 before
Ray starts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import assert_reproduces, load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image

from integration.model_families import build_flux, build_sd3, build_transformer_controlnet

SIZE = {"width": 64, "height": 64}
ROWS = [
    {"id": "plain", "prompt": "a red circle", "seed": 5, "controlnet": None, "control_image": None, **SIZE},
    {"id": "edges", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1", "control_image": "c1.png", **SIZE},
    {"id": "other", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1", "control_image": "c2.png", **SIZE},
    {"id": "zero", "prompt": "a red circle", "seed": 5, "controlnet": "edges:0", "control_image": "c1.png", **SIZE},
    {"id": "both", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1,depth:0.5", "control_image": "c1.png|c2.png", **SIZE},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny FLUX.1 [dev] and SD3 folders, each with two ControlNets, two control images."""
    tmp = tmp_path_factory.mktemp("controlnet-transformers")
    found = {}
    # SD3's last block takes no ControlNet residual: two blocks, so that one does
    for name, model in (("flux-dev", build_flux(tmp / "flux-dev")), ("sd3", build_sd3(tmp / "sd3", num_layers=2))):
        found[name] = {
            "model": model,
            "controlnets": {cn: str(build_transformer_controlnet(model, tmp / f"{name}-{cn}", seed=seed)) for cn, seed in (("edges", 1), ("depth", 2))},
        }
    for n in (1, 2):
        Image.fromarray((np.random.default_rng(n).random((48, 80, 3)) * 255).astype(np.uint8)).save(tmp / f"c{n}.png")
    return {"tmp": tmp, "manifest": write_manifest(tmp / "m.parquet", ROWS), **found}


@pytest.fixture(scope="module", params=["flux-dev", "sd3"])
def job(request, ray_address, models):
    family = models[request.param]
    spec = models["tmp"] / f"{request.param}.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": str(family["model"])}, "controlnets": family["controlnets"]}))
    out = models["tmp"] / f"out-{request.param}"
    result = cli(ray_address, "submit", models["manifest"], "--spec", spec, "--out", out, "--steps", "2")
    assert result.returncode == 0, result.stderr
    return {"out": out, "index": {r["id"]: r for r in load_index(out)}}


def _pixels(job, row_id) -> np.ndarray:
    assert job["index"][row_id]["status"] == "ok", job["index"][row_id]
    return np.asarray(Image.open(job["out"] / job["index"][row_id]["key"]).convert("RGB"))


def test_a_controlnet_row_follows_its_control_image_and_scale_0_is_no_controlnet(job):
    plain, edges, other, zero, both = (_pixels(job, i) for i in ("plain", "edges", "other", "zero", "both"))
    assert not np.array_equal(edges, plain)
    assert not np.array_equal(edges, other)
    assert not np.array_equal(both, edges)
    # the residuals times 0 add nothing, and no generator was drawn from for the control image
    assert np.array_equal(zero, plain)
    assert [(c["name"], c["scale"]) for c in job["index"]["both"]["controlnets"]] == [("edges", 1.0), ("depth", 0.5)]


def test_a_controlnet_row_reproduces_byte_exact(job):
    assert_reproduces(job["out"], "edges", "both")


def _dry_run(manifest, spec) -> subprocess.CompletedProcess:
    """``sdbatch submit --dry-run`` with Ray made unimportable: the refusal comes before it."""
    code = "import sys; sys.modules['ray'] = None; from sdbatch.cli.main import main; sys.argv = ['sdbatch', 'submit', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, str(manifest), "--spec", str(spec), "--out", str(spec.parent / "out"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("family", "misfit", "expected"),
    [
        ("flux-dev", {"joint_attention_dim": 48}, "joint_attention_dim 48 (the model's transformer: 32)"),
        ("sd3", {"caption_projection_dim": 16}, "caption_projection_dim 16 (the model's transformer: 32)"),
        ("flux-dev", {"num_mode": 10}, "is a union ControlNet (10 modes), which needs a control mode"),
        ("sd3", None, "names class 'FluxControlNetModel', not SD3ControlNetModel (SD3 / SD3.5's ControlNet class)"),
    ],
)
def test_a_controlnet_that_does_not_fit_exits_2_at_preflight(models, tmp_path, family, misfit, expected):
    model = models[family]["model"]
    bad = build_transformer_controlnet(model, tmp_path / "cn", seed=3, **misfit) if misfit else models["flux-dev"]["controlnets"]["edges"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": str(model)}, "controlnets": {"edges": str(bad)}}))
    result = _dry_run(models["manifest"], spec)
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert f"controlnet 'edges' ({bad})" in err and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
