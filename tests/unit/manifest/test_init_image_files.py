"""validate checks local init images are readable regular files (issue 26 item 6): a warning
listing the rows, a refusal of each row with --strict; readable and s3:// ones pass."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdbatch.manifest.sources import open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec


@pytest.fixture
def manifest(tmp_path: Path) -> str:
    (tmp_path / "ok.png").write_bytes(b"\x89PNG not checked here")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "locked.png").write_bytes(b"x")
    (tmp_path / "locked.png").chmod(0)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    values = ["ok.png", "missing.png", "folder.png", "locked.png", "dangling.png", None, "s3://bucket/a.png"]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(values))], "prompt": ["a"] * len(values),
                             "init_image": values}), path)
    return str(path)


def _unreadable(tmp_path: Path) -> dict[str, str]:
    expected = {"r1": "missing.png does not exist", "r2": "folder.png is not a regular file",
                "r4": "dangling.png does not exist"}
    if os.geteuid() != 0:  # root reads a file of mode 0
        expected["r3"] = "locked.png is not readable"
    return expected


def test_unreadable_init_images_are_a_warning_listing_the_rows(manifest, tmp_path):
    report = validate_manifest(open_manifest(manifest), JobSpec())
    assert report.ok, report.render()
    expected = _unreadable(tmp_path)
    [warning] = report.warnings
    assert warning.startswith(f"{len(expected)} row(s) whose init_image cannot be read now")
    for rid, text in expected.items():
        assert f"(id {rid}): {tmp_path}/{text}" in warning
    assert "(id r0)" not in warning and "(id r6)" not in warning and "--strict" in warning


def test_strict_refuses_each_unreadable_row(manifest, tmp_path):
    report = validate_manifest(open_manifest(manifest), JobSpec(), strict=True)
    expected = _unreadable(tmp_path)
    assert {i.id: i.rule for i in report.issues} == {
        rid: f"init_image must be a readable file; this one {text.split(' ', 1)[1]}" for rid, text in expected.items()}
    assert all(i.column == "init_image" and str(tmp_path) in i.fix for i in report.issues)
    assert not report.warnings


def test_each_control_image_of_a_row_is_checked_too(tmp_path):
    """Issue 26 item 6 for ControlNet rows: every image of ``control_image`` (``|``-separated)."""
    (tmp_path / "edges.png").write_bytes(b"\x89PNG not checked here")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["ok", "second"], "prompt": ["a", "a"], "controlnet": ["edges", "edges,depth"],
                             "control_image": ["edges.png", "edges.png|depth.png"]}), path)
    spec = JobSpec(controlnets={"edges": str(tmp_path), "depth": str(tmp_path)})
    [warning] = validate_manifest(open_manifest(str(path)), spec).warnings
    assert warning.startswith("1 row(s)") and f"(id second): control_image {tmp_path}/depth.png does not exist" in warning
    [issue] = validate_manifest(open_manifest(str(path)), spec, strict=True).issues
    assert (issue.id, issue.column) == ("second", "control_image") and "depth.png" not in issue.rule
