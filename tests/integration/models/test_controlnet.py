"""ControlNet rows (issue 26 item 4): spec-declared ControlNet folders (``controlnets: {NAME:
FOLDER}``), per row a ``controlnet`` column (``NAME:SCALE,…``) and its ``control_image`` (one
image, or one per ControlNet separated by ``|``), on builtin:tiny with tiny random ControlNets.
A ControlNet row differs from the same row without it and with another control image; scale 0
renders as no ControlNet; two ControlNets run in one row; records pin the ControlNets and the
control images by sha256 and reproduce byte-exact; a ControlNet that does not fit the model, an
undeclared one and a row without its image exit 2 before Ray starts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image
from typer.testing import CliRunner

from integration.model_families import build_controlnet
from sdbatch.cli.app import app
from sdbatch.models.builtin import resolve_builtin

ROWS = [
    {"id": "plain", "prompt": "a red circle", "seed": 5, "controlnet": None, "control_image": None},
    {"id": "edges", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1", "control_image": "c1.png"},
    {"id": "other", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1", "control_image": "c2.png"},
    {"id": "zero", "prompt": "a red circle", "seed": 5, "controlnet": "edges:0", "control_image": "c1.png"},
    {"id": "both", "prompt": "a red circle", "seed": 5, "controlnet": "edges:1,depth:0.5", "control_image": "c1.png|c2.png"},
]


def _control_image(path, seed: int):
    Image.fromarray((np.random.default_rng(seed).random((48, 80, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Two ControlNets for builtin:tiny, two control images, the spec declaring the ControlNets."""
    tmp = tmp_path_factory.mktemp("controlnet")
    tiny = resolve_builtin("builtin:tiny")
    controlnets = {"edges": str(build_controlnet(tiny, tmp / "cn-edges", seed=1)), "depth": str(build_controlnet(tiny, tmp / "cn-depth", seed=2))}
    for n in (1, 2):
        _control_image(tmp / f"c{n}.png", n)
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}, "controlnets": controlnets}))
    return {"tmp": tmp, "spec": spec, "manifest": write_manifest(tmp / "m.parquet", ROWS)}


@pytest.fixture(scope="module")
def job(ray_address, assets):
    out = assets["tmp"] / "out"
    result = cli(ray_address, "submit", assets["manifest"], "--spec", assets["spec"], "--out", out, "--steps", "2")
    assert result.returncode == 0, result.stderr
    return {**assets, "out": out, "index": {r["id"]: r for r in load_index(out)}}


def _pixels(job, row_id) -> np.ndarray:
    return np.asarray(Image.open(job["out"] / job["index"][row_id]["key"]).convert("RGB"))


def test_a_controlnet_row_follows_its_control_image_and_scale_0_is_no_controlnet(job):
    plain, edges, other, zero = (_pixels(job, i) for i in ("plain", "edges", "other", "zero"))
    assert not np.array_equal(edges, plain)
    assert not np.array_equal(edges, other)
    # the residuals times 0 add nothing: the same pixels as the row without a ControlNet
    assert np.array_equal(zero, plain)


def test_two_controlnets_run_in_one_row_and_records_pin_them(job):
    both = job["index"]["both"]
    assert both["status"] == "ok" and not np.array_equal(_pixels(job, "both"), _pixels(job, "edges"))
    sha = {n: hashlib.sha256((job["tmp"] / f"c{n}.png").read_bytes()).hexdigest() for n in (1, 2)}
    assert both["control_image_sha256"] == [sha[1], sha[2]]
    assert [(c["name"], c["scale"]) for c in both["controlnets"]] == [("edges", 1.0), ("depth", 0.5)]
    from sdbatch.models.pins import fingerprint_model_dir

    assert both["controlnets"][0]["sha256"] == fingerprint_model_dir(job["tmp"] / "cn-edges")
    from sdbatch.output.encode import read_embedded

    text, record = read_embedded((job["out"] / both["key"]).read_bytes())
    assert f'ControlNet 0: "Module: none, Model: edges [{both["controlnets"][0]["sha256"][:8]}], Weight: 1"' in text
    assert f'ControlNet 1: "Module: none, Model: depth [{both["controlnets"][1]["sha256"][:8]}], Weight: 0.5"' in text
    assert record["control_image_sha256"] == [sha[1], sha[2]] and record["controlnet"] == "edges:1,depth:0.5"
    # a row without ControlNets keeps its record as before: no ControlNet keys
    text, record = read_embedded((job["out"] / job["index"]["plain"]["key"]).read_bytes())
    assert "ControlNet" not in text and not {"controlnet", "controlnets", "control_image_sha256"} & record.keys()
    # the job's model pin covers the ControlNets' content
    job_record = json.loads((job["out"] / "_sdbatch" / "job.json").read_text())
    assert job_record["model"]["fingerprint"].startswith("cn:")


@pytest.mark.parametrize("row_id", ["both", "edges"])
def test_a_controlnet_row_reproduces_byte_exact(job, row_id):
    from sdbatch.audit.reproduce import reproduce_row

    result = reproduce_row(str(job["out"]), row_id)
    assert result.match, (result.summary(), result.notes)


def _submit(*args) -> subprocess.CompletedProcess:
    """``sdbatch submit`` with Ray made unimportable: what is refused must be refused before it."""
    code = "import sys; sys.modules['ray'] = None; from sdbatch.cli.main import main; sys.argv = ['sdbatch', 'submit', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_a_controlnet_that_does_not_fit_the_model_exits_2_at_preflight(assets, tmp_path):
    bad = build_controlnet(resolve_builtin("builtin:tiny"), tmp_path / "cn-sd15", seed=3, cross_attention_dim=48)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}, "controlnets": {"edges": str(bad)}}))
    out = tmp_path / "out"
    result = _submit(assets["manifest"], "--spec", spec, "--out", out, "--dry-run")
    err = " ".join(result.stderr.split())
    assert result.returncode == 2, result.stderr
    assert f"controlnet 'edges' ({bad}) does not fit model 'builtin:tiny'" in err
    assert "cross_attention_dim 48 (the model's unet: 32)" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"controlnet": "canny:1", "control_image": "c1.png"}, "ControlNet(s) canny not declared for this job"),
        ({"controlnet": "edges:1"}, "needs a control_image in the same row"),
        ({"controlnet": "edges:1,depth:1", "control_image": "c1.png|c2.png|c1.png"}, "names 3 images for 2 ControlNets"),
        ({"control_image": "c1.png"}, "control_image is only for ControlNet rows"),
        ({"controlnet": "edges:1", "control_image": "c1.png", "init_image": "c1.png"}, "text-to-image rows only"),
    ],
)
def test_a_bad_controlnet_row_exits_2_naming_the_row(assets, row, expected):
    manifest = write_manifest(
        assets["tmp"] / f"bad-{abs(hash(expected))}.parquet", [{"id": "fine", "prompt": "a", **dict.fromkeys(row)}, {"id": "bad", "prompt": "a", **row}]
    )
    result = CliRunner().invoke(app, ["validate", str(manifest), "--spec", str(assets["spec"])])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, text
    assert "row 1 (id 'bad')" in text and expected in text and "Traceback" not in text, text
