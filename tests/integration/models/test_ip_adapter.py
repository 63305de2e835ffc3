"""IP-Adapter rows (issue 26 item 4): a spec-declared IP-Adapter (``ip_adapter: {weights: FILE,
image_encoder: FOLDER}``), per row a reference image (``ip_adapter_image``) and its scale
(``ip_adapter_scale``), on builtin:tiny with a tiny random IP-Adapter and CLIP image encoder built
as diffusers' own tests build theirs. A row with a reference image differs from the same row
without it and with another image; scale 0 renders as no adapter; the record pins the reference
image by sha256 and the job's model pin covers the adapter; the rows reproduce byte-exact; an
IP-Adapter that does not fit the model exits 2 at preflight naming the file, and rows that set
the columns where they do not apply are refused naming the row."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml
from conftest import assert_refused, assert_reproduces, load_index, stored_pixels, submit_jobs, write_manifest
from PIL import Image
from typer.testing import CliRunner

from integration.model_families import build_ip_adapter
from sdbatch.cli.app import app
from sdbatch.models.builtin import resolve_builtin

ROWS = [
    {"id": "plain", "prompt": "a red circle", "seed": 5, "ip_adapter_image": None, "ip_adapter_scale": None},
    {"id": "ref", "prompt": "a red circle", "seed": 5, "ip_adapter_image": "r1.png", "ip_adapter_scale": None},
    {"id": "other", "prompt": "a red circle", "seed": 5, "ip_adapter_image": "r2.png", "ip_adapter_scale": None},
    {"id": "zero", "prompt": "a red circle", "seed": 5, "ip_adapter_image": "r1.png", "ip_adapter_scale": 0.0},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An IP-Adapter for builtin:tiny, two reference images, the spec declaring the adapter."""
    tmp = tmp_path_factory.mktemp("ip_adapter")
    weights, encoder = build_ip_adapter(resolve_builtin("builtin:tiny"), tmp / "ipa", seed=1)
    for n in (1, 2):
        Image.fromarray((np.random.default_rng(n).random((48, 80, 3)) * 255).astype(np.uint8)).save(tmp / f"r{n}.png")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}, "ip_adapter": {"weights": str(weights), "image_encoder": str(encoder)}}))
    plain_spec = tmp / "plain.yaml"
    plain_spec.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}}))
    return {"tmp": tmp, "spec": spec, "plain_spec": plain_spec, "manifest": write_manifest(tmp / "m.parquet", ROWS)}


@pytest.fixture(scope="module")
def job(ray_address, assets):
    out = submit_jobs(ray_address, assets["manifest"], assets["tmp"], {"out": ["--spec", assets["spec"]]}, "--steps", "2")["out"]
    return {**assets, "out": out, "index": {r["id"]: r for r in load_index(out)}}


def test_a_reference_image_conditions_its_row_and_scale_0_is_no_adapter(job):
    plain, ref, other, zero = (stored_pixels(job["out"], job["index"][i]) for i in ("plain", "ref", "other", "zero"))
    assert not np.array_equal(ref, plain)
    assert not np.array_equal(ref, other)
    # the adapter's attention is skipped at scale 0: the same pixels as the row without a reference image
    assert np.array_equal(zero, plain)


def test_the_record_pins_the_reference_image_and_the_adapter(job):
    from sdbatch.output.encode import read_embedded

    sha = hashlib.sha256((job["tmp"] / "r1.png").read_bytes()).hexdigest()
    ref = job["index"]["ref"]
    assert ref["ip_adapter_image_sha256"] == sha and ref["ip_adapter_scale"] == 1.0
    _, record = read_embedded((job["out"] / ref["key"]).read_bytes())
    assert record["ip_adapter_image_sha256"] == sha and record["ip_adapter_scale"] == 1.0
    assert record["ip_adapter_image"] == str(job["tmp"] / "r1.png")
    # a row without a reference image keeps its record as before: no IP-Adapter keys
    _, record = read_embedded((job["out"] / job["index"]["plain"]["key"]).read_bytes())
    assert not {"ip_adapter_image", "ip_adapter_scale", "ip_adapter_image_sha256"} & record.keys()
    job_record = json.loads((job["out"] / "_sdbatch" / "job.json").read_text())
    assert job_record["model"]["fingerprint"].startswith("ipa:")


def test_ip_adapter_rows_reproduce_byte_exact(job):
    assert_reproduces(job["out"], "ref", "zero")


def test_an_ip_adapter_that_does_not_fit_the_model_exits_2_at_preflight(ray_address, assets, tmp_path):
    weights, encoder = build_ip_adapter(resolve_builtin("builtin:tiny"), tmp_path / "ipa-wide", seed=2, cross_attention_dim=48)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny"}, "ip_adapter": {"weights": str(weights), "image_encoder": str(encoder)}}))
    assert_refused(
        ray_address,
        assets["manifest"],
        tmp_path / "out",
        [
            (
                ["--spec", spec],
                f"ip_adapter: {weights} does not fit model 'builtin:tiny': its to_k_ip weights are 32×48, "
                "the model's unet attn2.to_k weights 32×32 (out × cross_attention_dim)",
            ),
        ],
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("row", "spec", "expected"),
    [
        ({"ip_adapter_image": "r1.png"}, "plain_spec", "ip_adapter_image is only for jobs with an IP-Adapter"),
        ({"ip_adapter_scale": 0.5}, "spec", "ip_adapter_scale is only for rows with a reference image"),
    ],
)
def test_a_row_where_the_adapter_does_not_apply_exits_2_naming_the_row(assets, row, spec, expected):
    manifest = write_manifest(
        assets["tmp"] / f"bad-{len(expected)}.parquet", [{"id": "fine", "prompt": "a", **dict.fromkeys(row)}, {"id": "bad", "prompt": "a", **row}]
    )
    result = CliRunner().invoke(app, ["validate", str(manifest), "--spec", str(assets[spec])])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, text
    assert "row 1 (id 'bad')" in text and expected in text and "Traceback" not in text, text
