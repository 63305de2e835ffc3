"""Readers and deleters trust nothing they read (issue 21, findings 3, 4, 5, 11, 20): ``export``
copies only bytes that are the rows' recorded images, ``report`` and ``grid`` say when what they
show is not; ``reproduce`` takes its parameters from the index and reads init images only from
the job's places; ``--new-run`` deletes only objects holding the bytes the job recorded; ``stats``
summarises nested label columns; an ``hf`` export keeps ids that differ only by case apart. Each
test fails on the code before the fix (commit 439cfa8) and goes through the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_index, sdbatch_cli, write_manifest
from PIL import Image

from sdbatch.output.encode import encode_image, read_embedded

FAST = ["--model", "builtin:tiny", "--steps", "2", "--rows-per-shard", "4", "--batch-size", "2", "--workers", "1"]


def said(result) -> str:
    return " ".join((result.stdout + result.stderr).split())


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def job(ray_address, tmp_path_factory):
    """A finished 4-row grid job: ids ``A`` and ``a`` (differ only by case), list, struct and map
    label columns, and one img2img row ``b`` whose init image lies beside the manifest."""
    root = tmp_path_factory.mktemp("readers")
    (root / "inputs").mkdir()
    init = np.zeros((64, 64, 3), dtype=np.uint8)
    init[8:56, 8:40] = (220, 30, 30)
    Image.fromarray(init).save(root / "inputs" / "init.png")
    manifest = root / "m.parquet"
    pq.write_table(pa.table({
        "id": ["A", "a", "b", "c"],
        "prompt": ["a red circle", "a blue square", "a green circle", "a red square"],
        "seed": [1, 2, 3, 4],
        "init_image": [None, None, "inputs/init.png", None],
        "strength": [None, None, 0.7, None],
        "tags": pa.array([["red", "round"], ["blue"], ["red", "round"], None], pa.list_(pa.string())),
        "meta": pa.array([{"shape": "circle"}, {"shape": "square"}, {"shape": "circle"}, {"shape": "square"}]),
        "attrs": pa.array([[("size", 1)], [("size", 2)], [("size", 1)], []], pa.map_(pa.string(), pa.int64())),
        "grid_group": [0, 0, 0, 0],
        "grid_axes": ["seed"] * 4,
    }), manifest)
    out = root / "out"
    result = sdbatch_cli(ray_address, "submit", manifest, "--out", out, *FAST)
    assert result.returncode == 0, result.stderr
    return out, {r["id"]: r for r in load_index(out)}


def tampered_copy(job, tmp_path: Path, row_id: str) -> tuple[Path, bytes]:
    """A copy of the job whose image of ``row_id`` holds other bytes (still a PNG); its original bytes."""
    out, index = job
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    image = copy / index[row_id]["key"]
    original = image.read_bytes()
    flipped = Image.fromarray(pixels(original)[::-1].copy())
    buffer = io.BytesIO()
    flipped.save(buffer, format="PNG")
    image.write_bytes(buffer.getvalue())
    return copy, original


# --- 11. stats summarises list, struct and map label columns -------------------------------------


def test_stats_counts_list_struct_and_map_labels(run_cli, job):
    out, _ = job
    result = run_cli("stats", out, "--json")
    assert result.returncode == 0, result.stderr  # was a traceback, exit 1 (value_counts has no kernel)
    labels = json.loads(result.stdout)["labels"]
    assert labels["tags"] == {'["red", "round"]': 2, '["blue"]': 1, "None": 1}
    assert labels["meta"] == {'{"shape": "circle"}': 2, '{"shape": "square"}': 2}
    assert labels["attrs"] == {'[["size", 1]]': 2, "[]": 1, '[["size", 2]]': 1}
    text = run_cli("stats", out)
    assert text.returncode == 0, text.stderr
    assert ' tags: ["red", "round"]=2, None=1, ["blue"]=1\n' in text.stdout and 'label ' not in text.stdout


# --- 20. ids that differ only by case ------------------------------------------------------------


def test_hf_export_keeps_ids_that_differ_only_by_case(run_cli, job, tmp_path):
    """The images are inline in the Parquet shards, never files that a case-insensitive
    filesystem would merge: ``A`` and ``a`` are two rows with their own images."""
    out, index = job
    exported = run_cli("export", out, "--to", "hf", tmp_path / "ds")
    assert exported.returncode == 0, exported.stderr
    rows = pq.read_table(tmp_path / "ds" / "data").to_pylist()
    assert sorted(r["image"]["path"] for r in rows) == ["A.png", "a.png", "b.png", "c.png"]
    for r in rows:
        assert r["image"]["bytes"] == (out / index[r["id"]]["key"]).read_bytes()


# --- 3. export, report and grid check the bytes they read ----------------------------------------


def test_export_refuses_an_image_that_is_not_the_indexed_one(run_cli, job, tmp_path):
    copy, _ = tampered_copy(job, tmp_path, "c")
    _, index = job
    refused = run_cli("export", copy, "--to", "webdataset", tmp_path / "wds")
    assert refused.returncode == 5, refused.stderr
    assert f"1 images in file://{copy} are not the bytes their index rows recorded" in said(refused)
    assert f"c {index['c']['key']} (" in said(refused) and "1 of 1 output shards holding them were not written" in said(refused)
    assert not list((tmp_path / "wds").glob("*.tar"))

    skipped = run_cli("export", copy, "--to", "hf", tmp_path / "ds", "--where", "id <> 'a'", "--skip-mismatched")
    assert skipped.returncode == 0, skipped.stderr
    assert "exported 2 images" in skipped.stdout and "left out 1 rows" in said(skipped)
    rows = pq.read_table(tmp_path / "ds" / "data").to_pylist()
    assert [(r["id"], r["image"]["path"]) for r in rows] == [("A", "A.png"), ("b", "b.png")]
    for r in rows:
        assert r["image"]["bytes"] == (copy / r["key"]).read_bytes()

    report = run_cli("report", copy)
    assert report.returncode == 0, report.stderr
    assert (copy / "report.html").read_text().count("not the image the index recorded") == 1

    grid = run_cli("grid", copy, "-o", tmp_path / "grids")
    assert grid.returncode == 0, grid.stderr
    assert "1 cells show images that are not the bytes their index rows recorded: c " in said(grid)


# --- 5. --new-run deletes only the bytes the old job wrote ---------------------------------------


def test_new_run_keeps_a_foreign_object_at_a_failed_rows_key_and_an_altered_image(run_cli, tmp_path):
    rows = [{"id": f"t{i}", "prompt": f"a red circle {i}", "seed": 10 + i} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    claimed = run_cli("submit", manifest, "--out", out, *FAST, "--deadline", "0s")  # claims OUT, runs nothing
    assert claimed.returncode == 4, claimed.stderr
    foreign = out / "images" / "00000" / "t0.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"the user's own file")
    ran = run_cli("submit", manifest, "--out", out, *FAST)
    assert ran.returncode == 3, ran.stderr  # t0 failed: its key holds an object sdbatch did not write
    index = {r["id"]: r for r in load_index(out)}
    assert index["t0"]["status"] == "failed" and index["t0"]["key"] == "images/00000/t0.png"
    altered = out / index["t1"]["key"]
    altered.write_bytes(b"edited by hand after the job")

    replaced = run_cli("submit", write_manifest(tmp_path / "b.parquet", rows[:2]), "--out", out, *FAST, "--new-run")
    assert replaced.returncode == 2, replaced.stderr  # the objects kept are not the new job's either
    assert "holds 2 objects that no sdbatch job there wrote" in said(replaced)
    assert foreign.read_bytes() == b"the user's own file" and altered.read_bytes() == b"edited by hand after the job"
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".sdbatch-tmp-" not in p.name)
    assert left == ["images/00000/t0.png", "images/00000/t1.png"]  # the job's own images and state went


# --- 4. reproduce takes its parameters from the index and reads only the job's places ------------


def test_reproduce_ignores_a_tampered_record_and_reads_init_images_only_from_the_jobs_places(run_cli, job, tmp_path):
    copy, original = tampered_copy(job, tmp_path, "b")
    _, index = job
    elsewhere = tmp_path / "elsewhere" / "secret.png"  # outside the job's places, and another picture
    elsewhere.parent.mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(elsewhere)
    _, record = read_embedded(original)
    assert record["model_name"] == "builtin:tiny" and record["init_image"] == index["b"]["init_image"]
    record.update(init_image=str(elsewhere), model_name="builtin:shapes")  # the same picture, a lying record
    (copy / index["b"]["key"]).write_bytes(encode_image(pixels(original), record, fmt="png"))

    result = run_cli("reproduce", copy, "b")
    assert result.returncode == 0, said(result)  # the index's init image and the job's model: the same bytes
    assert "b: bytes match" in result.stdout and "record from the index" in result.stdout
    assert "the stored image is not the one the index recorded (size" in said(result)
    assert "MODEL CHANGED" not in said(result) and "changed since generation" not in said(result)

    # an index naming an init image outside the job's places is refused too
    table = pq.read_table(copy / "index.parquet")
    paths = [str(elsewhere) if p else p for p in table.column("init_image").to_pylist()]
    at = table.schema.get_field_index("init_image")
    pq.write_table(table.set_column(at, "init_image", pa.array(paths, pa.string())), copy / "index.parquet")
    refused = run_cli("reproduce", copy, "b")
    assert refused.returncode == 2, said(refused)
    assert f"init image {elsewhere} resolves to {elsewhere}, outside the places this job read init images from" \
        in said(refused) and "Traceback" not in refused.stderr


def test_new_run_keeps_a_foreign_tar_and_deletes_the_jobs_own(run_cli, tmp_path):
    rows = [{"id": f"t{i}", "prompt": f"a red circle {i}", "seed": 10 + i} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    flags = ["--model", "builtin:null", "--rows-per-shard", "2", "--batch-size", "2", "--workers", "1",
             "--set", "output.format=webdataset"]
    assert run_cli("submit", manifest, "--out", out, *flags, "--deadline", "0s").returncode == 4
    foreign = out / "shards" / "00000.tar"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's tar")
    ran = run_cli("submit", manifest, "--out", out, *flags)
    assert ran.returncode == 3, ran.stderr  # t0, t1 failed: their tar's key holds an object sdbatch did not write
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["00000.tar", "00001.tar"]

    replaced = run_cli("submit", write_manifest(tmp_path / "b.parquet", rows[:1]), "--out", out, *flags, "--new-run")
    assert replaced.returncode == 2, replaced.stderr
    assert "holds 1 objects that no sdbatch job there wrote (shards/00000.tar)" in said(replaced)
    assert foreign.read_bytes() == b"someone else's tar" and not (out / "shards" / "00001.tar").exists()
