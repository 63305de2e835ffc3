"""Dataset synthesis (issue 17): quality columns and duplicates in the index, the CLIP score,
`sdbatch export` (Hugging Face datasets, webdataset), `sdbatch stats`, grids.

One small job on builtin:shapes (a grid manifest plus two identical rows, scored by a tiny
random CLIP built here) serves most tests; the blank flag is proven on a tests-side model
whose VAE decodes everything to one grey.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, load_index, sdbatch_cli
from PIL import Image

SHAPES = REPO / "sdbatch" / "models" / "shapes"


def tiny_clip(folder: Path) -> Path:
    """A random-weight transformers CLIP folder (safetensors) with the shapes model's tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    CLIPTokenizer.from_pretrained(SHAPES / "tokenizer").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def job(ray_address, tmp_path_factory):
    """The module's one job: 4 template prompts × a 2×2 grid (seed × guidance_scale) + 2 identical rows."""
    tmp = tmp_path_factory.mktemp("dataset")
    grid_manifest = tmp / "grid.parquet"
    built = sdbatch_cli(ray_address, "manifest", "-o", grid_manifest, "-t",
                        "a {size=small|large} {colour=red|blue} circle, white background",
                        "--grid", "seed=1-2 guidance_scale=3,5")
    assert built.returncode == 0, built.stderr
    twins = [{"id": f"dup-{c}", "prompt": "a large green square, black background", "seed": 42,
              "guidance_scale": 5.0} for c in "ab"]
    manifest = tmp / "manifest.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(grid_manifest), pa.Table.from_pylist(twins)],
                                    promote_options="permissive"), manifest)
    out = tmp / "out"
    clip = tiny_clip(tmp / "clip")
    run = sdbatch_cli(ray_address, "submit", manifest, "--out", out, "--model", "builtin:shapes", "--steps", 4,
                      "--batch-size", 32, "--workers", 1, "--set", f"scoring.clip_model={clip}")
    assert run.returncode == 0, run.stderr
    return {"tmp": tmp, "out": out, "grid_manifest": grid_manifest, "clip": clip,
            "index": {r["id"]: r for r in load_index(out)}}


def test_grid_manifest_rows(job):
    rows = pq.read_table(job["grid_manifest"]).to_pylist()
    assert len(rows) == 16
    first = [(r["id"], r["seed"], r["guidance_scale"], r["grid_group"], r["grid_axes"]) for r in rows[:4]]
    assert first == [("00000000-seed1-guidance_scale3.0", 1, 3.0, 0, "seed,guidance_scale"),
                     ("00000000-seed1-guidance_scale5.0", 1, 5.0, 0, "seed,guidance_scale"),
                     ("00000000-seed2-guidance_scale3.0", 2, 3.0, 0, "seed,guidance_scale"),
                     ("00000000-seed2-guidance_scale5.0", 2, 5.0, 0, "seed,guidance_scale")]
    assert {r["prompt"] for r in rows[:4]} == {"a small red circle, white background"}
    assert [r["size"] for r in rows[::4]] == ["small", "small", "large", "large"]


def test_quality_columns_and_clip_score(job):
    index = job["index"]
    assert len(index) == 18 and {r["status"] for r in index.values()} == {"ok"}
    for r in index.values():
        assert len(r["phash"]) == 16 and int(r["phash"], 16) >= 0
        assert 0 <= r["luma_mean"] <= 255 and r["luma_std"] > 2.0 and r["blank"] is False
        assert r["clip_score"] is not None and r["clip_score"] >= 0
        image = Image.open(job["out"] / r["key"]).convert("L")
        assert abs(sum(image.tobytes()) / (64 * 64) - r["luma_mean"]) < 1e-3
    assert len({r["clip_score"] for r in index.values()}) > 1  # depends on the image and prompt


def test_identical_rows_are_duplicates_and_distinct_prompts_are_not(job):
    index = job["index"]
    a, b = index["dup-a"], index["dup-b"]
    assert a["sha256"] != b["sha256"]  # the embedded record names the row
    assert a["phash"] == b["phash"] and a["duplicate_of"] is None and b["duplicate_of"] == "dup-a"
    assert {r["id"] for r in index.values() if r["duplicate_of"]} == {"dup-b"}
    assert len({r["phash"] for r in index.values()}) == 17


def test_clip_score_matches_a_direct_computation(job):
    from sdbatch.models.clip_score import ClipScorer

    r = job["index"]["dup-a"]
    scorer = ClipScorer.load(str(job["clip"]))
    assert scorer.score([r["prompt"]], [Image.open(job["out"] / r["key"]).convert("RGB")]) == pytest.approx(
        [r["clip_score"]], abs=1e-3)


def test_stats_json_and_text(job):
    res = sdbatch_cli("", "stats", job["out"], "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert (stats["rows"], stats["ok"], stats["failed"], stats["blank"], stats["duplicates"]) == (18, 18, 0, 0, 1)
    assert stats["labels"]["size"] == {"large": 8, "small": 8, "None": 2}
    assert stats["labels"]["colour"]["red"] == 8
    clip = stats["scores"]["clip_score"]
    assert clip["count"] == 18 and clip["min"] <= clip["p50"] <= clip["max"]
    text = sdbatch_cli("", "stats", job["out"])
    assert text.returncode == 0 and "duplicates  1" in text.stdout and "size: large=8" in text.stdout


def test_export_hf_loads_in_datasets_with_a_filter(job, tmp_path):
    import datasets

    dest = tmp_path / "hf"
    res = sdbatch_cli("", "export", job["out"], "--to", "hf", dest,
                      "--where", "not blank and duplicate_of is null and size = 'small'")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (dest / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    cache = str(tmp_path / "hf-cache")
    loaded = datasets.load_dataset(str(dest), split="train", cache_dir=cache)
    assert loaded.num_rows == 8
    assert set(loaded["size"]) == {"small"} and all("small" in p for p in loaded["prompt"])
    for column in ("seed", "guidance_scale", "colour", "phash", "clip_score", "duplicate_of", "sha256"):
        assert column in loaded.column_names
    sample = loaded[0]
    stored = Image.open(job["out"] / job["index"][sample["id"]]["key"])
    assert sample["image"].convert("RGB").tobytes() == stored.convert("RGB").tobytes()

    everything = tmp_path / "all"
    assert sdbatch_cli("", "export", job["out"], "--to", "hf", everything).returncode == 0
    assert pq.read_table(everything / "data").num_rows == 18


def test_export_webdataset_from_s3_reshards_by_size(job, s3_bucket, tmp_path):
    import boto3
    import webdataset

    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in job["out"].rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"run/{path.relative_to(job['out']).as_posix()}")
    dest = tmp_path / "wds"
    res = sdbatch_cli("", "export", f"s3://{bucket}/run", "--to", "webdataset", dest, "--shard-size", 20_000,
                      "--where", "duplicate_of is null and guidance_scale = 5", "--s3-endpoint", endpoint)
    assert res.returncode == 0, res.stderr
    tars = sorted(str(p) for p in dest.glob("shard-*.tar"))
    assert len(tars) > 1
    samples = list(webdataset.WebDataset(tars, shardshuffle=False).decode("pil"))
    expected = {r["id"] for r in job["index"].values() if r["guidance_scale"] == 5 and not r["duplicate_of"]}
    assert {s["json"]["id"] for s in samples} == expected and len(samples) == 9
    for s in samples:
        assert s["png"].size == (64, 64) and s["json"]["phash"] == job["index"][s["json"]["id"]]["phash"]


def test_export_refuses_a_bad_filter_and_a_used_dir(job, tmp_path):
    dest = tmp_path / "x"
    res = sdbatch_cli("", "export", job["out"], "--to", "hf", dest, "--where", "bogus_column > 1")
    assert res.returncode == 2 and "--where 'bogus_column > 1'" in res.stderr and "bogus_column" in res.stderr
    assert not dest.exists()
    from sdbatch.datasets.export import ExportError, ExportOptions, export

    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(str(job["out"]), str(dest), ExportOptions(to="hf"))
    assert [p.name for p in dest.iterdir()] == ["mine.txt"]
    with pytest.raises(ExportError, match="--to 'csv': use one of hf, webdataset"):
        export(str(job["out"]), str(tmp_path / "y"), ExportOptions(to="csv"))


def test_grid_images(job, tmp_path):
    res = sdbatch_cli("", "grid", job["out"], "-o", tmp_path / "grids")
    assert res.returncode == 0, res.stderr
    paths = sorted((tmp_path / "grids").iterdir())
    assert [p.name for p in paths] == [f"grid-{i:05d}.png" for i in range(4)]
    sheet = Image.open(paths[0]).convert("RGB")
    cell = 128
    left, top = sheet.width - 2 * cell, sheet.height - 2 * cell
    assert left > 0 and top > 0
    # the cell at X = seed 2, Y = guidance 5 is that row's image, scaled up
    stored = Image.open(job["out"] / job["index"]["00000000-seed2-guidance_scale5.0"]["key"]).convert("RGB")
    expected = stored.resize((cell, cell), Image.Resampling.NEAREST)
    assert sheet.crop((left + cell, top + cell, left + 2 * cell, top + 2 * cell)).tobytes() == expected.tobytes()


def test_submit_refuses_a_missing_clip_model(tmp_path):
    from conftest import write_manifest

    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "a red circle"}])
    res = sdbatch_cli("", "submit", manifest, "--out", tmp_path / "out", "--set",
                      f"scoring.clip_model={tmp_path / 'nope'}")
    assert res.returncode == 2 and "scoring.clip_model" in res.stderr and "no config.json" in res.stderr
    assert not (tmp_path / "out").exists()


def blank_model(folder: Path) -> Path:
    """builtin:tiny with a VAE whose last convolution outputs 0 everywhere: every image is one grey."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(REPO / "sdbatch" / "models" / "tiny", folder)
    weights_path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_path)
    for name in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
        weights[name] = weights[name] * 0
    save_file(weights, weights_path)
    return folder


def test_blank_images_are_flagged_and_near_uniform_twins_share_a_phash(tmp_path):
    """In-process (no Ray) with the webdataset layout, which export and stats then read."""
    import datasets
    from conftest import write_manifest

    from sdbatch.datasets.export import ExportOptions, export
    from sdbatch.datasets.stats import job_stats
    from sdbatch.manifest.reader import passthrough_types, read_rows
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.runtime import load_model
    from sdbatch.output.claim import claim_job, job_record
    from sdbatch.output.index import merge_index, open_index
    from sdbatch.run.plan import ShardSpec
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    model = blank_model(tmp_path / "blank-model")
    spec = load_spec(None, [], {"model.name": str(model), "defaults.steps": 2, "output.format": "webdataset"})
    source = open_manifest(str(write_manifest(tmp_path / "m.parquet", [
        {"id": "g1", "prompt": "a red circle", "seed": 1}, {"id": "g2", "prompt": "a blue square", "seed": 2}])))
    storage = LocalStorage(tmp_path / "out")
    job = job_record(spec, source, None)
    claim_job(storage, job)
    ShardRunner(load_model(str(model)), storage, spec, job_fingerprint=job.fingerprint).run_shard(
        ShardSpec(0, range(2)), read_rows(source, spec, 0, 2))
    assert job_stats(open_index(storage, job.fingerprint))["duplicates"] is None  # not merged yet: not known
    assert merge_index(storage, ["00000"], 2, passthrough_types(source), job.fingerprint).duplicates == 1
    rows = {r["id"]: r for r in load_index(tmp_path / "out")}
    assert rows["g1"]["blank"] is True and rows["g1"]["luma_std"] == 0
    assert rows["g1"]["sha256"] != rows["g2"]["sha256"] and rows["g2"]["duplicate_of"] == "g1"
    assert rows["g1"]["key"] == "shards/00000.tar#g1.png"
    stats = job_stats(open_index(storage, job.fingerprint))
    assert (stats["blank"], stats["duplicates"]) == (2, 1)

    assert export(str(tmp_path / "out"), str(tmp_path / "hf"),
                  ExportOptions(to="hf", where="blank and duplicate_of is null")).rows == 1
    loaded = datasets.load_dataset(str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["id"] == ["g1"] and loaded[0]["image"].convert("L").getextrema() == (128, 128)


def hand_index(tmp_path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path = tmp_path / "index.parquet"
    pq.write_table(pa.table({
        "row": pa.array(range(len(rows)), pa.int64()), "id": [r[0] for r in rows], "status": [r[1] for r in rows],
        "sha256": [r[2] for r in rows], "phash": [r[3] for r in rows], "duplicate_of": pa.nulls(len(rows), pa.string()),
    }), path, row_group_size=2)
    return path


def test_mark_duplicates_by_sha256_exact_and_near_phash(tmp_path):
    """An index without colour hashes (merged before they existed) compares by phash alone."""
    from sdbatch.output.quality import DuplicateRule, mark_duplicates

    index = hand_index(tmp_path, [
        ("a", "ok", "s1", "ffffffffffffffff"),
        ("b", "ok", "s1", "0000000000000000"),     # same bytes as a
        ("c", "ok", "s3", "0000000000000000"),     # same phash as b
        ("d", "failed", None, None),
        ("e", "ok", "s5", "0000000000000003"),     # 2 bits from b's phash
        ("f", "ok", "s6", "00000000000000ff"),     # 8 bits from b, 6 from e
    ])
    def marked(distance: int) -> dict[str, str | None]:
        out = tmp_path / f"marked-{distance}.parquet"
        mark_duplicates(index, out, DuplicateRule(distance))
        table = pq.read_table(out)
        assert table.column("row").to_pylist() == list(range(6))
        return dict(zip(table.column("id").to_pylist(), table.column("duplicate_of").to_pylist()))

    assert marked(0) == {"a": None, "b": "a", "c": "b", "d": None, "e": None, "f": None}
    assert marked(2) == {"a": None, "b": "a", "c": "b", "d": None, "e": "b", "f": None}
    assert marked(6) == {"a": None, "b": "a", "c": "b", "d": None, "e": "b", "f": "e"}


def triangle(colour: str, size: int = 64, apex: int = 10):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).polygon([(10, 50), (32, apex), (54, 50)], fill=colour)
    return image


def test_colour_hash_and_label_scope_decide_duplicates(tmp_path):
    """Issue 27: a green and a red triangle share a phash (it is blind to hue) but are not
    duplicates; the same red triangle twice is; ``within`` keeps classes apart; the colour
    distance is tunable."""
    from sdbatch.output.quality import DuplicateRule, mark_duplicates, measure_image

    images = [("red", triangle("red"), "a"), ("green", triangle("green"), "a"), ("red-again", triangle("red"), "b"),
              ("red-twin", triangle((250, 0, 0)), "a"), ("blue", triangle("blue"), "a"),
              ("red-shifted", triangle("red", apex=12), "a")]
    measured = {name: measure_image(image, 2.0) for name, image, _ in images}
    assert measured["red"]["phash"] == measured["green"]["phash"] == measured["blue"]["phash"]
    assert measured["red"]["colour_hash"] != measured["green"]["colour_hash"]
    path = tmp_path / "index.parquet"
    pq.write_table(pa.table({
        "row": pa.array(range(len(images)), pa.int64()), "id": [n for n, _, _ in images],
        "status": ["ok"] * len(images), "sha256": [f"s{i}" for i in range(len(images))],
        "phash": [measured[n]["phash"] for n, _, _ in images],
        "colour_hash": [measured[n]["colour_hash"] for n, _, _ in images],
        "label": [label for _, _, label in images], "duplicate_of": pa.nulls(len(images), pa.string()),
    }), path)

    def marked(rule: DuplicateRule) -> dict[str, str]:
        out = tmp_path / "marked.parquet"
        mark_duplicates(path, out, rule)
        table = pq.read_table(out)
        return {i: d for i, d in zip(table.column("id").to_pylist(), table.column("duplicate_of").to_pylist()) if d}

    shifted = bin(int(measured["red"]["phash"], 16) ^ int(measured["red-shifted"]["phash"], 16)).count("1")
    assert shifted > 0
    assert marked(DuplicateRule()) == {"red-again": "red", "red-twin": "red"}
    assert marked(DuplicateRule(within="label")) == {"red-twin": "red"}
    assert marked(DuplicateRule(max_distance=shifted, within="label")) == {"red-twin": "red", "red-shifted": "red"}
    # every colour hash within reach: colour no longer tells the triangles apart
    assert marked(DuplicateRule(colour_max_distance=42)) == {
        "green": "red", "red-again": "red", "red-twin": "red", "blue": "red"}
    with pytest.raises(ValueError, match="'shape' is not a column of the index"):
        marked(DuplicateRule(within="shape"))
