"""Instruction-edit models (issue 26 item 4): FLUX.1 Kontext edits each row's ``init_image`` as
its prompt says, so an edit-pair dataset is one manifest. On a tiny random Kontext: edit rows
run through the CLI at the row's size, follow their source image, record its sha256, render
alone as in a batch of two (to one level, design.md §4.3), and reproduce byte-exact; a row without an init
image, or with a strength, is refused at validation naming the row. Qwen-Image-Edit, whose
processor needs torchvision, is refused naming what it lacks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import load_index, write_manifest
from conftest import sdbatch_cli as cli
from PIL import Image
from typer.testing import CliRunner

from integration.families_2026 import build_flux_kontext
from sdbatch.cli.app import app

ROWS = [
    {"id": "red", "prompt": "make the square red", "seed": 3, "init_image": "a.png"},
    {"id": "other", "prompt": "make the square red", "seed": 3, "init_image": "b.png"},
]
SIZE = ["--steps", "2", "--width", "80", "--height", "64"]


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kontext")
    for name, seed in (("a", 1), ("b", 2)):
        Image.fromarray((np.random.default_rng(seed).random((40, 24, 3)) * 255).astype(np.uint8)).save(tmp / f"{name}.png")
    return {"tmp": tmp, "model": build_flux_kontext(tmp / "kontext"), "manifest": write_manifest(tmp / "m.parquet", ROWS)}


def _submit(ray_address, kontext, out_name: str, *args: str) -> dict:
    out = kontext["tmp"] / out_name
    result = cli(ray_address, "submit", kontext["manifest"], "--model", kontext["model"], "--out", out, *SIZE, *args)
    assert result.returncode == 0, result.stderr
    return {r["id"]: r for r in load_index(out)} | {"out": out}


@pytest.fixture(scope="module")
def job(ray_address, kontext):
    return {**kontext, "index": _submit(ray_address, kontext, "out", "--batch-size", "2")}


def _pixels(out, entry) -> np.ndarray:
    return np.asarray(Image.open(out / entry["key"]).convert("RGB"))


def test_an_edit_row_follows_its_source_image_and_pins_it(job):
    index = job["index"]
    red, other = (_pixels(index["out"], index[i]) for i in ("red", "other"))
    assert red.shape == (64, 80, 3) and not np.array_equal(red, other)
    assert index["red"]["init_image_sha256"] == hashlib.sha256((job["tmp"] / "a.png").read_bytes()).hexdigest()
    assert index["red"]["batch_rows"] == ["red", "other"]  # the two rows ran as one batch


def test_an_edit_row_alone_is_its_batched_self(ray_address, job):
    """Per-row generators (the source image's encoding included): a row alone renders as in its
    batch of two, to CPU rounding (design.md §4.3: at most one level; reproduce rebuilds the batch)."""
    alone = _submit(ray_address, job, "out-alone", "--batch-size", "1")
    assert alone["red"]["batch_rows"] == ["red"]
    for row_id in ("red", "other"):
        batched = _pixels(job["index"]["out"], job["index"][row_id]).astype(int)
        assert np.abs(_pixels(alone["out"], alone[row_id]).astype(int) - batched).max() <= 1, row_id


def test_an_edit_row_reproduces_byte_exact(job):
    from sdbatch.audit.reproduce import reproduce_row

    result = reproduce_row(str(job["index"]["out"]), "red")
    assert result.match, (result.summary(), result.notes)


def _validate(kontext, name: str, rows: list[dict], *args: str):
    manifest = write_manifest(kontext["tmp"] / f"{name}.parquet", rows)
    result = CliRunner().invoke(app, ["validate", str(manifest), "--set", f"model.name={kontext['model']}", *args])
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize(
    ("row", "column", "expected"),
    [
        ({"init_image": None}, "init_image", "FLUX.1 Kontext models (FluxKontextPipeline) edit a source image: every row needs an init_image"),
        ({"init_image": "a.png", "strength": 0.5}, "strength", "strength is not used by FLUX.1 Kontext models"),
    ],
)
def test_an_edit_row_without_a_source_image_or_with_strength_is_refused(kontext, row, column, expected):
    code, text = _validate(
        kontext,
        f"bad-{column}",
        [{"id": "fine", "prompt": "a", "init_image": "a.png", "strength": None}, {"id": "bad", "prompt": "a", "strength": None, **row}],
    )
    assert code == 2, text
    assert f"row 1 (id 'bad'), column '{column}'" in text and expected in text and "Traceback" not in text, text
    assert "row 0" not in text


def test_an_edit_row_of_one_step_is_valid(kontext):
    """No strength multiplies an edit row's steps (img2img's steps × strength >= 1 rule)."""
    code, text = _validate(kontext, "one-step", [{"id": "one", "prompt": "a", "init_image": "a.png"}], "--set", "defaults.steps=1")
    assert code == 0, text


@pytest.mark.parametrize("class_name", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_qwen_image_edit_is_refused_naming_what_it_lacks(kontext, tmp_path, class_name):
    folder = tmp_path / "qwen-edit"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    result = CliRunner().invoke(app, ["validate", str(manifest), "--set", f"model.name={folder}"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, text
    assert f"{class_name!r}: Qwen-Image-Edit is not run yet: its prompt processor (transformers' Qwen2VLProcessor" in text
    assert "needs torchvision" in text and "use FLUX.1 Kontext (FluxKontextPipeline)" in text and "Traceback" not in text


def test_a_job_default_strength_on_an_edit_model_is_refused(kontext):
    code, text = _validate(kontext, "default-strength", ROWS, "--set", "defaults.strength=0.5")
    assert code == 2, text
    assert "column 'defaults.strength': value 0.5" in text and "edits take no strength" in text, text
