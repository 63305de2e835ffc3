"""``submit --new-run``: an OUT holding another job is replaced by the new one — every object
the old job wrote goes, the user's own files stay, no old image is adopted by the new job —
and a clear interrupted by a storage outage leaves the old job resumable."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow.parquet as pq
from conftest import write_manifest

from integration.faults import fault_env
from sdbatch.output.encode import read_embedded
from sdbatch.storage.open import open_storage

FAST = ["--model", "builtin:tiny", "--steps", "3", "--rows-per-shard", "3", "--batch-size", "3", "--workers", "1"]


def manifests(tmp_path):
    """Job A: a00–a07. Job B: b00–b04 plus a03 with another prompt and seed (same image key)."""
    a = write_manifest(tmp_path / "a.parquet",
                       [{"id": f"a{i:02d}", "prompt": f"a red circle {i}", "seed": i} for i in range(8)])
    b_rows = [{"id": f"b{i:02d}", "prompt": f"a blue square {i}", "seed": 50 + i} for i in range(5)]
    b = write_manifest(tmp_path / "b.parquet", [*b_rows, {"id": "a03", "prompt": "a green star", "seed": 999}])
    return a, b


def objects(out: str, endpoint: str | None = None) -> dict[str, bytes]:
    storage = open_storage(out, endpoint_url=endpoint)
    return {key: storage.get(key) for key in storage.list("") if key != "_sdbatch/lock.json"}


def check_only_job(out: str, manifest, endpoint: str | None = None) -> list[dict]:
    """OUT holds exactly this manifest's job: its index, and no image the index does not name."""
    stored = objects(out, endpoint)
    index = pq.read_table(io.BytesIO(stored["index.parquet"])).to_pylist()
    assert [r["id"] for r in index] == pq.read_table(manifest).column("id").to_pylist()
    images = {k for k in stored if k.startswith("images/")}
    assert images == {r["key"] for r in index}
    for r in index:
        _, record = read_embedded(stored[r["key"]])
        assert hashlib.sha256(stored[r["key"]]).hexdigest() == r["sha256"]
        assert (record["prompt"], record["seed"]) == (r["prompt"], r["seed"])
    job = json.loads(stored["_sdbatch/job.json"])
    assert job["manifest"]["source"].endswith(manifest.name)
    return index


def test_new_run_replaces_another_job_and_keeps_the_users_files(run_cli, tmp_path):
    a, b = manifests(tmp_path)
    out = tmp_path / "out"
    assert run_cli("submit", a, "--out", out, *FAST).returncode == 0
    (out / "notes").mkdir()
    (out / "notes" / "README.txt").write_text("the user's own file")
    before = objects(str(out))

    refused = run_cli("submit", b, "--out", out, *FAST)
    assert refused.returncode == 2
    assert "already holds a different job" in refused.stderr and "--new-run" in refused.stderr
    assert objects(str(out)) == before  # nothing touched

    replaced = run_cli("submit", b, "--out", out, *FAST, "--new-run")
    assert replaced.returncode == 0, replaced.stderr
    assert "deleted the previous job's" in replaced.stderr
    index = check_only_job(str(out), b)
    a03 = next(r for r in index if r["id"] == "a03")
    assert a03["sha256"] != hashlib.sha256(before[a03["key"]]).hexdigest()  # regenerated, not adopted
    assert (out / "notes" / "README.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["00000.parquet", "00001.parquet"]
    verify = run_cli("verify", out)
    said = " ".join(verify.stdout.split())
    assert verify.returncode == 0 and "orphans 0" in said and "result clean" in said, verify.stdout


def test_new_run_interrupted_by_a_storage_outage_leaves_the_old_job_resumable(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    a, b = manifests(tmp_path)
    out = f"s3://{bucket}/runs/replace"
    s3 = ["--s3-endpoint", endpoint]
    assert run_cli("submit", a, "--out", out, *FAST, *s3).returncode == 0
    old = objects(out, endpoint)

    # DeleteObjects calls 1-3 (metadata/, index.parquet, _SUCCESS) pass; images/ fails for good
    rules = {"DeleteObjects": {"after": 3, "errors": ["503"]}}
    cut = run_cli("submit", b, "--out", out, *FAST, *s3, "--new-run", "--set", "retries.storage_attempts=2",
                  env=fault_env(rules))
    assert cut.returncode == 5, cut.stderr
    assert "run the same command again to go on" in cut.stderr
    left = objects(out, endpoint)
    assert not [k for k in left if k.startswith("metadata/")] and "index.parquet" not in left
    assert left["_sdbatch/job.json"] == old["_sdbatch/job.json"]  # still names job A
    assert {k for k in left if k.startswith("images/")} == {k for k in old if k.startswith("images/")}

    resumed = run_cli("submit", a, "--out", out, *FAST, *s3)  # job A again, without --new-run
    assert resumed.returncode == 0, resumed.stderr
    index = check_only_job(out, a, endpoint)
    assert {r["sha256"] for r in index} == {hashlib.sha256(old[r["key"]]).hexdigest() for r in index}


def test_new_run_refused_on_a_folder_without_a_job_leaves_it_as_it_was(run_cli, tmp_path):
    """Issue 21 finding 19(a): the refusal writes nothing — not even an empty ``_sdbatch/``."""
    a, _ = manifests(tmp_path)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.txt").write_text("the user's own file")
    refused = run_cli("submit", a, "--out", out, "--model", "builtin:null", "--new-run")
    assert refused.returncode == 2 and "holds no sdbatch job (no _sdbatch/job.json)" in refused.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["holiday.txt"]
