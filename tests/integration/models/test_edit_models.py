"""Instruction-edit models (issue 26 item 4): FLUX.1 Kontext and Qwen-Image-Edit edit each row's
``init_image`` as its prompt says, so an edit-pair dataset is one manifest. On a tiny random
model of each: edit rows run through the CLI at the row's size, follow their source image,
record its sha256 and no strength (the model's default is none), render alone as in a batch of two
(to one level, design.md §4.3), and reproduce byte-exact, as images recorded with the old default
strength do; a row without an init image, or with a strength (the row's or the job's), is refused
at validation naming the row. Qwen-Image-Edit runs without torchvision (its processor built without
the video processor); Qwen-Image-Edit-2509's several-image pipeline is refused naming what to use."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import load_index, submit_jobs, write_manifest
from PIL import Image
from typer.testing import CliRunner

from integration.families_2026 import build_flux_kontext, build_qwen_image_edit
from sdbatch.cli.app import app

ROWS = [
    {"id": "red", "prompt": "make the square red", "seed": 3, "init_image": "a.png"},
    {"id": "other", "prompt": "make the square red", "seed": 3, "init_image": "b.png"},
]
SIZE = ["--steps", "2", "--width", "80", "--height", "64"]


#: each edit model: its builder and how validation names it
EDIT_MODELS = {
    "kontext": (build_flux_kontext, "FLUX.1 Kontext models (FluxKontextPipeline)"),
    "qwen_edit": (build_qwen_image_edit, "Qwen-Image-Edit models (QwenImageEditPipeline)"),
}


@pytest.fixture(scope="module", params=list(EDIT_MODELS))
def kontext(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    # a dark and a bright source: a tiny random Qwen-Image-Edit's layer norms and near-uniform
    # attention average a source's noise away, and keep only (a trace of) its brightness
    for name, seed, low in (("a", 1, 0), ("b", 2, 215)):
        pixels = low + np.random.default_rng(seed).random((40, 24, 3)) * 40
        Image.fromarray(pixels.astype(np.uint8)).save(tmp / f"{name}.png")
    build, label = EDIT_MODELS[request.param]
    return {"tmp": tmp, "model": build(tmp / request.param), "label": label, "manifest": write_manifest(tmp / "m.parquet", ROWS)}


@pytest.fixture(scope="module")
def job(ray_address, kontext):
    """The rows in one batch of two ("index") and each alone ("alone"): the two jobs two at a time."""
    outs = submit_jobs(ray_address, kontext["manifest"], kontext["tmp"], {"out": ["--batch-size", "2"], "out-alone": ["--batch-size", "1"]},
                       "--model", kontext["model"], *SIZE)
    return {**kontext, **{key: {r["id"]: r for r in load_index(outs[name])} | {"out": outs[name]}
                          for key, name in (("index", "out"), ("alone", "out-alone"))}}


def _pixels(out, entry) -> np.ndarray:
    return np.asarray(Image.open(out / entry["key"]).convert("RGB"))


def test_an_edit_row_follows_its_source_image_and_pins_it(job):
    index = job["index"]
    red, other = (_pixels(index["out"], index[i]) for i in ("red", "other"))
    assert red.shape == (64, 80, 3) and not np.array_equal(red, other)
    assert index["red"]["init_image_sha256"] == hashlib.sha256((job["tmp"] / "a.png").read_bytes()).hexdigest()
    assert index["red"]["batch_rows"] == ["red", "other"]  # the two rows ran as one batch


def test_an_edit_row_alone_is_its_batched_self(job):
    """Per-row generators (the source image's encoding included): a row alone renders as in its
    batch of two, to CPU rounding (design.md §4.3: at most one level; reproduce rebuilds the batch)."""
    alone = job["alone"]
    assert alone["red"]["batch_rows"] == ["red"]
    for row_id in ("red", "other"):
        batched = _pixels(job["index"]["out"], job["index"][row_id]).astype(int)
        assert np.abs(_pixels(alone["out"], alone[row_id]).astype(int) - batched).max() <= 1, row_id


def _recorded_with_strength(out, copy, strength: float):
    """A copy of ``out`` as an sdbatch from before edit models took no default strength wrote it:
    each image's record and infotext, and its index row, hold the job default ``strength``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sdbatch.audit.job_output import open_job
    from sdbatch.output.encode import encode_image, read_embedded

    shutil.copytree(out, copy)
    output = open_job(str(copy)).spec.output
    index = pq.read_table(copy / "index.parquet")
    rows = index.to_pylist()
    for row in rows:
        image = copy / row["key"]
        _, record = read_embedded(image.read_bytes())
        data = encode_image(np.asarray(Image.open(image).convert("RGB")), {**record, "strength": strength},
                            fmt=output.image_format, png_compress_level=output.png_compress_level, quality=output.quality)
        image.write_bytes(data)
        row.update(strength=strength, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), copy / "index.parquet")
    return copy


def test_an_edit_row_records_no_strength_and_reproduces_byte_exact(job):
    """The edit takes no strength (the reader applies none: the model's default is none): not in
    the index, the record or the infotext. An image recorded with the old job default 0.75
    reproduces byte for byte too: the edit pipeline never took it."""
    from sdbatch.audit.reproduce import reproduce_row
    from sdbatch.output.encode import read_embedded

    entry = job["index"]["red"]
    infotext, record = read_embedded((job["index"]["out"] / entry["key"]).read_bytes())
    assert entry["strength"] is None and record["strength"] is None, (entry["strength"], record["strength"])
    assert "Denoising strength" not in infotext and "Steps: 2" in infotext, infotext
    result = reproduce_row(str(job["index"]["out"]), "red")
    assert result.match, (result.summary(), result.notes)
    before = _recorded_with_strength(job["index"]["out"], job["tmp"] / "recorded-with-strength", 0.75)
    infotext, record = read_embedded((before / entry["key"]).read_bytes())
    assert record["strength"] == 0.75 and "Denoising strength: 0.75" in infotext, infotext
    result = reproduce_row(str(before), "red")
    assert result.match and result.batch_rows == ["red", "other"], (result.summary(), result.notes)
    assert result.data == (before / entry["key"]).read_bytes()


def _validate(kontext, name: str, rows: list[dict], *args: str):
    manifest = write_manifest(kontext["tmp"] / f"{name}.parquet", rows)
    result = CliRunner().invoke(app, ["validate", str(manifest), "--set", f"model.name={kontext['model']}", *args])
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize(
    ("row", "column", "expected"),
    [
        ({"init_image": None}, "init_image", "{label} edit a source image: every row needs an init_image"),
        ({"init_image": "a.png", "strength": 0.5}, "strength", "strength is not used by {name} models"),
    ],
)
def test_an_edit_row_without_a_source_image_or_with_strength_is_refused(kontext, row, column, expected):
    expected = expected.format(label=kontext["label"], name=kontext["label"].split(" models")[0])
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


def test_qwen_image_edit_plus_is_refused_naming_what_to_use(tmp_path):
    folder = tmp_path / "qwen-edit-plus"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    result = CliRunner().invoke(app, ["validate", str(manifest), "--set", f"model.name={folder}"])
    text = " ".join((result.stdout + result.stderr).split())
    assert result.exit_code == 2, text
    assert "'QwenImageEditPlusPipeline': Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline, several source images) is not run yet" in text
    assert "its images are references shared by every prompt of a call" in text
    assert "use Qwen-Image-Edit (QwenImageEditPipeline) or FLUX.1 Kontext (FluxKontextPipeline)" in text and "Traceback" not in text


def test_a_job_default_strength_on_an_edit_model_is_refused(kontext):
    """Any strength set as the job default, the old default 0.75 included (the model's is none)."""
    code, text = _validate(kontext, "default-strength", ROWS, "--set", "defaults.strength=0.75")
    assert code == 2, text
    assert "column 'defaults.strength': value 0.75" in text and "edits take no strength" in text, text
    assert "fix: leave defaults.strength null for this model: remove it from the spec" in text and "Traceback" not in text, text
