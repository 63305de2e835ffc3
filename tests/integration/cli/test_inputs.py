"""What sdbatch takes in (issue 21, findings 1, 10, 13, 16, 19d): a manifest is generated only
as it was pinned at submit, a URI never carries credentials into a message, a spec cannot make
validation expand without bound, and a manifest directory never takes in sdbatch's own output.
Each test fails on the code before the fix, through the CLI where a user meets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import REPO

FAST = ["--model", "builtin:tiny", "--steps", "2", "--rows-per-shard", "2", "--batch-size", "2", "--workers", "1"]


def said(result) -> str:
    return " ".join((result.stdout + result.stderr).split())


def same_size_parquet(path: Path, prompts: list[str]) -> Path:
    """Plain-encoded, uncompressed, no statistics: a prompt changed to one of the same length
    changes neither the row count nor the file size."""
    table = pa.table({"id": [f"m{i}" for i in range(len(prompts))], "prompt": prompts, "seed": list(range(len(prompts)))})
    pq.write_table(table, path, use_dictionary=False, compression="none", write_statistics=False)
    return path


# --- 1. a manifest replaced while the job runs is refused by the workers ----------------------------


def test_a_manifest_replaced_during_the_run_stops_the_job_and_verify_says_so(run_cli, ray_address, tmp_path):
    original = [f"a red circle {i}" for i in range(8)]
    manifest = same_size_parquet(tmp_path / "m.parquet", original)
    swapped = same_size_parquet(tmp_path / "swapped.parquet", [f"a big square {i}" for i in range(8)])
    assert pq.read_metadata(swapped).num_rows == pq.read_metadata(manifest).num_rows
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdbatch", "submit", str(manifest), "--out", str(out), *FAST]
    driver = subprocess.Popen(args, env={**os.environ, "RAY_ADDRESS": ray_address}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "_sdbatch" / "job.json").exists():  # pinned and claimed; the worker is still starting
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.01)
    os.replace(swapped, manifest)
    stdout, stderr = driver.communicate(timeout=300)
    text = " ".join((stdout + stderr).split())
    assert driver.returncode == 2, text
    assert f"{manifest}: the manifest changed while the job ran" in text
    assert "Traceback" not in text
    assert not (out / "_SUCCESS").exists() and not (out / "index.parquet").exists()

    verified = run_cli("verify", out)
    assert verified.returncode != 0, said(verified)
    assert f"not checked against the job's manifest {manifest}: it changed since the job pinned it" in said(verified)

    same_size_parquet(manifest, original)  # restored: the same command goes on, with the pinned prompts
    resumed = run_cli("submit", manifest, "--out", out, *FAST)
    assert resumed.returncode == 0, said(resumed)
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["prompt"] for r in index) == sorted(original)


# --- 13. a spec's YAML cannot expand without bound -------------------------------------------------


def test_a_yaml_alias_bomb_in_a_spec_is_refused_at_once_and_messages_stay_short(run_cli, tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 11)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(["x-aliases:", *(f"  {line}" for line in levels), "defaults:", "  steps: *a10", ""]))
    assert bomb.stat().st_size < 1500  # 9**10 values once expanded
    manifest = same_size_parquet(tmp_path / "m.parquet", ["a red circle"])
    started = time.monotonic()
    refused = run_cli("validate", manifest, "--spec", bomb, timeout=60)
    assert refused.returncode == 2, said(refused)[:2000]
    assert time.monotonic() - started < 30
    assert f"job spec {bomb}: its YAML aliases (*name) expand to more than 10,000 values" in said(refused)

    wide = tmp_path / "wide.yaml"  # within the bound, and still never repeated whole in a message
    wide.write_text("defaults:\n  steps: [" + ", ".join(["123456789"] * 5000) + "]\n")
    refused = run_cli("validate", manifest, "--spec", wide)
    assert refused.returncode == 2, said(refused)[:2000]
    assert "defaults.steps: Input should be a valid integer" in said(refused)
    assert len(refused.stderr) < 1000, refused.stderr[:2000]


# --- 10, 19d. credentials in a URI are refused, never shown ----------------------------------------


def test_credentials_in_a_uri_or_the_endpoint_are_refused_and_never_shown(run_cli, tmp_path):
    manifest = same_size_parquet(tmp_path / "m.parquet", ["a red circle"])
    cases = [
        (["validate", "s3://AKIAXQ7:s3cr3tZ@bkt/m.parquet"], "manifest 's3://bkt/m.parquet'"),
        (["validate", "s3://AKIAXQ7:s3cr3tZ/x+y@bkt/m.parquet"], "manifest 's3://bkt/m.parquet'"),  # a secret holding '/'
        (["submit", manifest, "--out", "s3://AKIAXQ7:s3cr3tZ@bkt/out"], "--out 's3://bkt/out'"),
        (["submit", manifest, "--out", tmp_path / "out", "--model", "s3://AKIAXQ7:s3cr3tZ@bkt/model"],
         "model.name 's3://bkt/model'"),
        (["submit", manifest, "--out", tmp_path / "out", "--s3-endpoint", "http://AKIAXQ7:s3cr3tZ@127.0.0.1:9"],
         "--s3-endpoint 'http://127.0.0.1:9'"),
        (["status", "s3://AKIAXQ7:s3cr3tZ@bkt/out"], "location 's3://bkt/out'"),
    ]
    for args, named in cases:
        refused = run_cli(*args)
        text = said(refused)
        assert refused.returncode == 2, text
        assert f"{named} carries credentials" in text and "Traceback" not in text
        assert "AKIAXQ7" not in text and "s3cr3tZ" not in text, text
    assert not (tmp_path / "out").exists()


# --- 16. a directory manifest never takes in sdbatch's own output ----------------------------------


def test_submit_of_a_manifest_directory_keeps_out_beside_it_and_reruns_resume(ray_address, tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    same_size_parquet(folder / "m.parquet", [f"a red circle {i}" for i in range(4)])
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    submit = [sys.executable, "-m", "sdbatch", "submit", ".", *FAST]
    first = subprocess.run(submit, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, said(first)
    out = tmp_path / "sdbatch-out" / "prompts"
    assert (out / "index.parquet").exists() and not (folder / "sdbatch-out").exists()
    again = subprocess.run(submit, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, said(again)
    assert "every shard is already committed" in said(again)

    inside = folder / "old-run"  # an OUT someone put inside the directory is not read as manifest files
    shutil.copytree(out, inside)
    third = subprocess.run([*submit, "--out", tmp_path / "third"], cwd=folder, env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, said(third)
    assert len(pq.read_table(tmp_path / "third" / "index.parquet")) == 4
