"""``sdbatch export`` at scale (issue 23) and its dataset options (issue 27): output shards
written by Ray tasks to ``s3://`` (moto) that ``datasets`` loads, a resume after an interrupted
export that writes only the missing shards, the selection pass in memory that does not grow
with the index, an empty selection refused, ``--columns``, ``--class-column``, ``--split``, and
folders of normal modes. OUTs are synthetic (``tests/synthetic_output.py``): no model runs."""

from __future__ import annotations

import hashlib
import json
import stat
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synthetic_output import arrow_pool, build_output, row_id

from integration.faults import fault_env

ROWS = 400
FAILED_EVERY = 50  # rows 49, 99, …: failed, no image — never exported


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return build_output(tmp_path_factory.mktemp("export"), ROWS, rows_per_shard=100, failed_every=FAILED_EVERY)


def ok_ids(where=lambda row: True) -> set[str]:
    return {row_id(r) for r in range(ROWS) if r % FAILED_EVERY != FAILED_EVERY - 1 and where(r)}


def image_bytes(out: Path) -> int:
    return len(next((out / "images").rglob("*.png")).read_bytes())


def download(endpoint: str, bucket: str, prefix: str, into: Path) -> list[str]:
    """Every object under ``prefix`` into ``into``; their keys under ``prefix``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", ())]
    for key in keys:
        target = into / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return sorted(k[len(prefix):] for k in keys)


def split_of(rid: str) -> str:
    """The split ``--split train=0.75,test=0.25`` puts a row in: the first 8 bytes of its id's
    sha256 as a fraction of 2**64, below 0.75 → train."""
    return "train" if int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "big") / 2**64 < 0.75 else "test"


def test_export_to_s3_in_ray_tasks_loads_in_datasets(run_cli, out, s3_bucket, tmp_path):
    import datasets

    endpoint, bucket = s3_bucket
    res = run_cli("export", out, "--to", "hf", f"s3://{bucket}/ds", "--s3-endpoint", endpoint, "--parallel", "ray",
                  "--where", "label < 5", "--split", "train=0.75,test=0.25", "--class-column", "label",
                  "--columns", "id,prompt,seed", "--shard-size", 40 * image_bytes(out))
    assert res.returncode == 0, res.stderr
    local = tmp_path / "ds"
    keys = download(endpoint, bucket, "ds/", local)
    train = sorted(k for k in keys if k.startswith("data/train-"))
    test = sorted(k for k in keys if k.startswith("data/test-"))
    assert len(train) >= 3 and train[-1].endswith(f"-of-{len(train):05d}.parquet")
    assert f"exported {len(ok_ids(lambda r: r % 10 < 5))} images" in res.stdout
    loaded = datasets.load_dataset("parquet", data_files={"train": [str(local / k) for k in train],
                                                          "test": [str(local / k) for k in test]},
                                   cache_dir=str(tmp_path / "cache"))
    expected = ok_ids(lambda r: r % 10 < 5)
    for split in ("train", "test"):
        part = loaded[split]
        assert part.column_names == ["image", "id", "prompt", "seed", "label"]
        assert sorted(part["id"]) == sorted(rid for rid in expected if split_of(rid) == split)  # each once
        assert part.features["label"].names == ["0", "1", "2", "3", "4"]
        assert [part.features["label"].int2str(n) for n in part["label"]] == [str(int(i[-9:]) % 10) for i in part["id"]]
    sample = loaded["train"].cast_column("image", datasets.Image(decode=False))[0]
    assert sample["image"]["bytes"] == next((out / "images").rglob(f"{sample['id']}.png")).read_bytes()


def test_an_interrupted_export_resumes_without_rewriting_its_finished_shards(run_cli, out, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    dest = f"s3://{bucket}/wds"
    args = ("export", out, "--to", "webdataset", dest, "--s3-endpoint", endpoint, "--parallel", "local",
            "--shard-size", 50 * image_bytes(out))
    # the plan, then two shards and their markers go through; every later write fails
    cut = run_cli(*args, env=fault_env({"PutObject": {"after": 5, "errors": ["500"]}}))
    assert cut.returncode == 5, cut.stderr
    first = download(endpoint, bucket, "wds/", tmp_path / "first")
    marked = [k for k in first if k.startswith(".sdbatch-export/done/")]
    assert len(marked) == 2 and ".sdbatch-export/complete.json" not in first

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    kept = "wds/shard-000000.tar"
    original = client.get_object(Bucket=bucket, Key=kept)["Body"].read()
    client.put_object(Bucket=bucket, Key=kept, Body=b"left by the first run")  # a rewrite would replace it
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    shards = json.loads((tmp_path / "first" / ".sdbatch-export" / "plan.json").read_text())["shards"]
    assert f"{len(shards)} shards, 2 of them from an earlier run)" in " ".join(resumed.stdout.split())
    assert client.get_object(Bucket=bucket, Key=kept)["Body"].read() == b"left by the first run"
    client.put_object(Bucket=bucket, Key=kept, Body=original)

    import webdataset

    files = download(endpoint, bucket, "wds/", tmp_path / "second")
    tars = [str(tmp_path / "second" / k) for k in files if k.endswith(".tar")]
    assert len(tars) == len(shards) > 3
    samples = list(webdataset.WebDataset(sorted(tars), shardshuffle=False))
    ids = [json.loads(s["json"])["id"] for s in samples]
    assert sorted(ids) == sorted(ok_ids()) and len(ids) == len(set(ids))
    assert json.loads(samples[0]["json"])["label"] == 0  # labels at the top level
    again = run_cli(*args)  # a finished export: nothing to write, nothing rewritten
    assert again.returncode == 0 and f"{len(shards)} of them from an earlier run" in " ".join(again.stdout.split())


def test_an_empty_selection_is_refused_and_nothing_is_written(run_cli, out, tmp_path):
    res = run_cli("export", out, "--to", "hf", tmp_path / "ds", "--where", "label = 11")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    said = " ".join(res.stderr.split())
    assert f"no row of its {ROWS} (index.parquet) has an image (status 'ok') and matches --where 'label = 11'" in said
    assert not (tmp_path / "ds").exists()


def test_columns_leave_out_what_where_selects_by(run_cli, out, tmp_path):
    res = run_cli("export", out, "--to", "hf", tmp_path / "ds", "--columns", "id", "--where", "label = 3 and seed > 100")
    assert res.returncode == 0, res.stderr
    table = pq.read_table(tmp_path / "ds" / "data")
    assert table.column_names == ["image", "id"]
    assert sorted(table.column("id").to_pylist()) == sorted(ok_ids(lambda r: r % 10 == 3 and r > 100))


def test_bad_columns_split_and_class_column_are_refused(run_cli, out, tmp_path):
    for option, text in ((("--columns", "id,nope"), "--columns: no column 'nope' in the index"),
                         (("--split", "train=0.9,test=0.2"), "the fractions sum to 1.1, not 1"),
                         (("--class-column", "colour"), "--class-column: no column 'colour'"),
                         (("--parallel", "gpu"), "--parallel 'gpu': use one of ray, local, auto"),
                         (("--push-to", "me/ds", "--to", "webdataset"), "--push-to uploads a local hf export")):
        res = run_cli("export", out, "--to", "hf", tmp_path / "ds", *option)
        assert res.returncode == 2, (option, res.stderr)
        assert text in " ".join(res.stderr.split()) and "Traceback" not in res.stderr
        assert not (tmp_path / "ds").exists()


def test_a_local_export_has_normal_modes_and_webdataset_classes(run_cli, out, tmp_path):
    import webdataset

    dest = tmp_path / "wds"
    res = run_cli("export", out, "--to", "webdataset", dest, "--split", "train=0.5,val=0.5", "--class-column", "label",
                  "--columns", "id,label")
    assert res.returncode == 0, res.stderr
    for path in [dest, *dest.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others may read (the umask's, not 0700)
    samples = list(webdataset.WebDataset(str(dest / "val" / "shard-000000.tar"), shardshuffle=False))
    assert {s["__key__"] for s in samples} == {rid for rid in ok_ids() if split_of_half(rid) == "val"}
    for s in samples:
        record = json.loads(s["json"])
        assert set(record) == {"id", "label"} and int(s["cls"]) == record["label"]


def split_of_half(rid: str) -> str:
    return "train" if int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "big") / 2**64 < 0.5 else "val"


# --- memory: the selection pass does not grow with the index -----------------------------------


def selection_peak(root: Path, rows: int, monkeypatch) -> tuple[int, int]:
    """tracemalloc's and Arrow's peak bytes while ``plan_export`` streams the index of a
    ``rows``-row OUT: row groups of ~4,000 rows read 1,000 at a time, so that both sizes are
    many row groups and batches, as at ten million rows."""
    from sdbatch.datasets.export import ExportOptions, _open_job_index, plan_export
    from sdbatch.output import index as index_module
    from sdbatch.storage.local import LocalStorage

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "MERGE_ROW_GROUP_ROWS", 4_000)
        out = build_output(root, rows, objects=False)
    job, index = _open_job_index(LocalStorage(out))
    options = ExportOptions(to="hf", where="label < 5 and seed % 3 = 0", class_column="label",
                            splits=(("train", 0.9), ("test", 0.1)))
    with arrow_pool() as pool:
        tracemalloc.start()
        try:
            with monkeypatch.context() as patch:
                patch.setattr(index_module, "INDEX_BATCH_ROWS", 1_000)
                plan = plan_export(job, index, options)
            python_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert plan.rows == len([r for r in range(rows) if r % 10 < 5 and r % 3 == 0])
    return python_peak, pool.max_memory()



def test_the_selection_pass_memory_does_not_grow_with_the_rows(tmp_path, monkeypatch):
    small = selection_peak(tmp_path / "small", 5_000, monkeypatch)
    large = selection_peak(tmp_path / "large", 50_000, monkeypatch)
    assert large[0] < 1.5 * small[0], (small, large)  # Python objects
    assert large[1] < 1.5 * small[1], (small, large)  # Arrow buffers (outside Python's allocator)


def test_push_to_an_unreachable_hub_fails_after_a_complete_export(run_cli, out, tmp_path):
    """No network here: the Hub is a closed port on loopback. The export itself is complete;
    the same command pushes it once the Hub is reachable."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_test_token_not_real", "HF_HOME": str(tmp_path / "hf")}
    res = run_cli("export", out, "--to", "hf", tmp_path / "ds", "--push-to", "me/shapes", env=env)
    assert res.returncode == 5 and "Traceback" not in res.stderr, res.stderr
    said = " ".join(res.stderr.split())
    assert "--push-to me/shapes: the Hub could not be reached" in said and "rerun the same command to push it" in said
    assert f"exported {len(ok_ids())} images" in res.stdout and (tmp_path / "ds" / ".sdbatch-export" / "complete.json").exists()
    assert "hf_test_token_not_real" not in res.stdout + res.stderr
