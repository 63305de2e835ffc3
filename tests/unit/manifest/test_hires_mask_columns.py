"""The hires-fix and mask columns (issue 26) as rows and validation read them: the pass's
strength and steps only where hires_scale applies (in the row or the spec default), the mask
resolved like init_image, the upscaled size checked against the grid and the limits, and the
A1111 names pointing at the new columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.aliases import foreign
from sdbatch.data.hires import hires_size
from sdbatch.manifest.reader import read_rows
from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec, load_spec


def _manifest(tmp_path, rows):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return open_manifest(str(path))


def test_control_images_are_resolved_each_and_listed_in_order(tmp_path):
    manifest = _manifest(tmp_path, [{"prompt": "a", "controlnet": "edges,depth:0.5", "control_image": "e.png | /d/d.png"}])
    (row,) = read_rows(manifest, JobSpec(), 0, 1)
    assert row.control_image == f"{tmp_path / 'e.png'}|/d/d.png"
    assert row.images() == {"control_image": [str(tmp_path / "e.png"), "/d/d.png"]}


def test_rows_hold_the_hires_pass_only_where_it_applies_and_the_mask_resolved(tmp_path):
    manifest = _manifest(
        tmp_path,
        [
            {"prompt": "a", "hires_scale": 2.0, "hires_steps": None, "init_image": None, "mask_image": None},
            {"prompt": "b", "hires_scale": None, "hires_steps": None, "init_image": "i.png", "mask_image": "m.png"},
        ],
    )
    hires, inpaint = read_rows(manifest, JobSpec(), 0, 2)
    assert (hires.hires_scale, hires.hires_strength, hires.hires_steps) == (2.0, 0.7, None)
    assert (inpaint.hires_scale, inpaint.hires_strength, inpaint.hires_steps) == (None, None, None)
    assert inpaint.mask_image == str(tmp_path / "m.png") and inpaint.is_inpaint and not hires.is_inpaint
    assert inpaint.images() == {"init_image": [str(tmp_path / "i.png")], "mask_image": [str(tmp_path / "m.png")]}
    every_row = load_spec(None, ["defaults.hires_scale=1.5", "defaults.hires_steps=4"])
    assert [(r.hires_scale, r.hires_steps) for r in read_rows(manifest, every_row, 0, 2)] == [(2.0, 4), (1.5, 4)]


def test_validation_checks_the_upscaled_size_and_where_the_pass_applies(tmp_path):
    assert hires_size(64, 72, 1.5) == (96, 108)
    manifest = _manifest(
        tmp_path,
        [
            {"id": "ok", "prompt": "a", "width": 64, "hires_scale": 1.5, "hires_strength": None},
            {"id": "grid", "prompt": "a", "width": 72, "hires_scale": 1.5, "hires_strength": None},
            {"id": "big", "prompt": "a", "width": 1024, "hires_scale": 4.0, "hires_strength": None},
            {"id": "alone", "prompt": "a", "width": 64, "hires_scale": None, "hires_strength": 0.5},
        ],
    )
    issues = {(i.id, i.column): i for i in validate_manifest(manifest, JobSpec()).issues}
    assert set(issues) == {("grid", "hires_scale"), ("big", "hires_scale"), ("alone", "hires_strength")}
    assert "multiple of 8" in issues["grid", "hires_scale"].rule and "108" in issues["grid", "hires_scale"].value
    assert "limits.max_pixels" in issues["big", "hires_scale"].rule
    assert "needs hires_scale" in issues["alone", "hires_strength"].rule
    # with the pass set for every row by the spec default, the strength applies everywhere
    issues = validate_manifest(manifest, load_spec(None, ["defaults.hires_scale=2"])).issues
    assert ("alone", "hires_strength") not in {(i.id, i.column) for i in issues}


def test_a1111_hires_and_mask_names_point_at_the_new_columns():
    assert foreign("hr_scale").column == "hires_scale" and foreign("hr_second_pass_steps").column == "hires_steps"
    assert foreign("mask").column == "mask_image" and "hires_scale" in foreign("enable_hr").fix("enable_hr")
    assert "'hires_strength'" in foreign("denoising_strength").fix("denoising_strength")
