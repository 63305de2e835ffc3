"""Generation features through the CLI: mixed rows (sizes, samplers, guidance, img2img) in one
job, init-image strength, output formats (files / webdataset, png / webp / jpeg)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest
from PIL import Image

from sdbatch.data.samplers import A1111_BY_CLASS
from sdbatch.models.families.sd import StableDiffusion
from sdbatch.output.encode import parse_infotext, read_embedded

SCHEDULERS = StableDiffusion.samplers

TINY = ["--model", "builtin:tiny", "--steps", "4", "--batch-size", "4"]
# Measured (benchmarks/RESULTS.md, "Batch invariance"): a row generated alone and inside a
# batch differ by at most 1 uint8 level on CPU; identical batches give identical bytes.
BATCH_TOLERANCE = 1


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def mixed_rows(tmp_path) -> list[dict]:
    Image.new("RGB", (100, 60), (230, 40, 40)).save(tmp_path / "init.png")
    rows = []
    for i, scheduler in enumerate(SCHEDULERS):
        for j, (width, guidance) in enumerate(((64, 1.0), (80, 6.0))):
            rows.append({"id": f"{scheduler}-{j}", "prompt": f"a {scheduler} shape", "seed": 10 * i + j,
                         "scheduler": scheduler, "width": width, "height": 64, "guidance_scale": guidance,
                         "init_image": None, "strength": None, "negative_prompt": "blue" if j else None})
    for k in range(3):
        rows.append({"id": f"img2img-{k}", "prompt": "a red square", "seed": 100 + k, "scheduler": "euler_a",
                     "width": 64, "height": 64, "guidance_scale": 5.0, "init_image": "init.png",
                     "strength": 0.6, "negative_prompt": None})
    return rows


def test_mixed_manifest_every_sampler_size_guidance_and_img2img(run_cli, tmp_path):
    rows = mixed_rows(tmp_path)
    manifest = write_manifest(tmp_path / "mixed.parquet", rows)
    out = tmp_path / "out"
    result = run_cli("submit", manifest, "--out", out, *TINY, "--rows-per-shard", "7", "--workers", "2")
    assert result.returncode == 0, result.stderr
    index = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert set(index) == {r["id"] for r in rows}
    for row in rows:
        entry = index[row["id"]]
        data = (out / entry["key"]).read_bytes()
        assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
        text, record = read_embedded(data)
        params = parse_infotext(text)
        assert row["scheduler"] == record["scheduler"]
        if row["scheduler"] == "default":  # the model's own scheduler, named by its class
            own = A1111_BY_CLASS[record["scheduler_config"]["_class_name"]]
            assert f"Sampler: {own}," in text
        else:
            assert params["scheduler"] == row["scheduler"]
        assert (params["width"], params["height"]) == (row["width"], row["height"])
        assert params["guidance_scale"] == row["guidance_scale"] and params["seed"] == row["seed"]
        assert params["negative_prompt"] == (row["negative_prompt"] or "")
        assert params.get("strength") == row["strength"]
        if row["init_image"]:
            assert record["init_image"] == str(tmp_path / "init.png")
        # one canonical batch holds only rows that share size, steps, sampler, guidance and mode
        mates = [index[m] for m in entry["batch_rows"]]
        assert {(m["width"], m["scheduler"], m["guidance_scale"], m["init_image"]) for m in mates} == {
            (entry["width"], entry["scheduler"], entry["guidance_scale"], entry["init_image"])
        }

    # the same rows alone, in a manifest of their own, give the same images (within the
    # measured batch tolerance; identical bytes when the batch is the same)
    alone = [r for r in rows if r["id"] in ("euler_a-1", "dpmpp_2m_karras-0", "img2img-1")]
    manifest_alone = write_manifest(tmp_path / "alone.parquet", alone)
    out_alone = tmp_path / "alone"
    result = run_cli("submit", manifest_alone, "--out", out_alone, *TINY, "--rows-per-shard", "7")
    assert result.returncode == 0, result.stderr
    for entry in pq.read_table(out_alone / "index.parquet").to_pylist():
        a = pixels((out_alone / entry["key"]).read_bytes())
        b = pixels((out / index[entry["id"]]["key"]).read_bytes())
        assert np.abs(a - b).max() <= BATCH_TOLERANCE, entry["id"]


def test_webdataset_output_reads_back_with_the_webdataset_library(run_cli, small_manifest, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    result = run_cli("submit", small_manifest, "--out", out, *TINY, "--rows-per-shard", "10", "--format", "webdataset")
    assert result.returncode == 0, result.stderr
    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    assert not (out / "images").exists()
    index = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    seen = {}
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil"):
        record = sample["json"]
        seen[record["id"]] = sample
        assert sample["__key__"] == record["id"]
        assert sample["png"].size == (64, 64)
        assert index[record["id"]]["key"].endswith(f"#{record['id']}.png")
        assert record["seed"] == index[record["id"]]["seed"]
        assert record["label"] == record["extra"]["label"] == index[record["id"]]["label"]  # labels at the top level
    assert set(seen) == set(index)


@pytest.mark.parametrize("image_format, ext", [("webp", "webp"), ("jpeg", "jpg")])
def test_lossy_formats_carry_the_parameters(run_cli, small_manifest, tmp_path, image_format, ext):
    out = tmp_path / "out"
    result = run_cli("submit", small_manifest, "--out", out, *TINY, "--rows-per-shard", "12", "--image-format", image_format)
    assert result.returncode == 0, result.stderr
    for entry in pq.read_table(out / "index.parquet").to_pylist()[:6]:
        assert entry["key"].endswith("." + ext)
        data = (out / entry["key"]).read_bytes()
        text, record = read_embedded(data)
        assert parse_infotext(text)["prompt"] == entry["prompt"] and record["seed"] == entry["seed"]
        assert Image.open(io.BytesIO(data)).format == image_format.upper()


def test_img2img_strength_keeps_or_replaces_the_init_image(run_cli, tmp_path):
    """On the trained built-in model: strength 0.05 stays close to the init image, 1.0 does not."""
    init = np.zeros((64, 64, 3), np.uint8)
    init[:, :] = (245, 225, 40)  # yellow background
    init[16:48, 16:48] = (30, 70, 230)  # blue square
    Image.fromarray(init).save(tmp_path / "init.png")
    rows = [{"id": f"s{int(s * 100):03d}-{seed}", "prompt": "a large red circle in the center, green background",
             "seed": seed, "init_image": "init.png", "strength": s} for s in (0.05, 1.0) for seed in (1, 2)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = run_cli("submit", manifest, "--out", out, "--model", "builtin:shapes", "--steps", "20",
                     "--guidance-scale", "5")
    assert result.returncode == 0, result.stderr
    distance = {}
    for entry in pq.read_table(out / "index.parquet").to_pylist():
        image = pixels((out / entry["key"]).read_bytes())
        distance[entry["id"]] = float(np.abs(image - init.astype(np.int16)).mean())
    print("img2img mean abs distance to the init image:", distance)
    for seed in (1, 2):
        # measured: about 14 at strength 0.05 (the VAE round trip), about 98 at 1.0
        assert distance[f"s005-{seed}"] < 25  # close: only the VAE round trip and a little noise
        assert distance[f"s100-{seed}"] > 60  # the prompt, not the init image
        assert distance[f"s005-{seed}"] < 0.3 * distance[f"s100-{seed}"]


def test_img2img_rows_record_the_init_image_sha256(run_cli, tmp_path):
    """The worker hashes the init image bytes it read: the index and the image record hold the
    sha256; text-to-image rows and rows whose init image could not be read hold null."""
    Image.new("RGB", (64, 64), (30, 160, 40)).save(tmp_path / "init.png")
    expected = hashlib.sha256((tmp_path / "init.png").read_bytes()).hexdigest()
    rows = [{"id": "t0", "prompt": "a green square", "seed": 1, "init_image": None, "strength": None},
            {"id": "i0", "prompt": "a green square", "seed": 2, "init_image": "init.png", "strength": 0.5},
            {"id": "i1", "prompt": "a red square", "seed": 3, "init_image": "init.png", "strength": 0.5},
            {"id": "gone", "prompt": "a red square", "seed": 4, "init_image": "missing.png", "strength": 0.5}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    result = run_cli("submit", manifest, "--out", out, *TINY, "--rows-per-shard", "4")
    assert result.returncode == 3, result.stderr  # the row with the missing init image failed
    index = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    assert {i: r["status"] for i, r in index.items()} == {"t0": "ok", "i0": "ok", "i1": "ok", "gone": "failed"}
    assert all("init_image_sha256" in r for r in index.values())  # one schema for ok and failed rows
    assert index["gone"]["init_image_sha256"] is None and index["t0"]["init_image_sha256"] is None
    for rid in ("i0", "i1"):
        assert index[rid]["init_image_sha256"] == expected
        _, record = read_embedded((out / index[rid]["key"]).read_bytes())
        assert record["init_image_sha256"] == expected and record["init_image"] == str(tmp_path / "init.png")
    _, record = read_embedded((out / index["t0"]["key"]).read_bytes())
    assert "init_image_sha256" in record and record["init_image_sha256"] is None
