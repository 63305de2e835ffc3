"""What sdbatch trusts in OUT (issue 12): only its own commits and index, stamped with the job's
fingerprint — never bytes it did not just produce, a claim it did not win, a commit of another
job, a symlink out of OUT, a model or manifest that changed since submit, an init image from
outside the job's places, a writer's clock. Each test fails on the code before the fix; every
case a user meets is driven through the CLI, on local and S3 storage where both apply."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RAY_SINGLE_MACHINE, REPO, write_manifest

from sdbatch.data.index import JOB_KEY, index_schema
from sdbatch.models.builtin import resolve_builtin
from sdbatch.models.pins import fingerprint_model_dir
from sdbatch.output.claim import claim_job
from sdbatch.output.commits import OutputMismatch, read_commit, read_shard_index, records_to_parquet
from sdbatch.output.documents import JobRecord
from sdbatch.storage.base import StorageConfigError
from sdbatch.storage.local import LocalStorage
from sdbatch.storage.open import open_storage

FAST = ["--model", "builtin:tiny", "--steps", "2", "--rows-per-shard", "2", "--batch-size", "2", "--workers", "1"]


def rows(n: int = 4, prefix: str = "t") -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"a red circle {i}", "seed": 10 + i} for i in range(n)]


def s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def said(result) -> str:
    return " ".join((result.stdout + result.stderr).split())


def location(kind: str, tmp_path: Path, request) -> tuple[str, list[str]]:
    """An empty OUT (local directory or s3 prefix) and the CLI flags it needs."""
    if kind == "local":
        return str(tmp_path / "out"), []
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", ["--s3-endpoint", endpoint]


def endpoint_of(flags: list[str]) -> str | None:
    return flags[1] if flags else None


# --- 1. adoption compares bytes ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_foreign_bytes_at_an_image_key_fail_that_row_and_verify_reports_them(kind, run_cli, tmp_path, request):
    manifest = write_manifest(tmp_path / "m.parquet", rows())
    out, flags = location(kind, tmp_path, request)
    claimed = run_cli("submit", manifest, "--out", out, *FAST, *flags, "--deadline", "0s")  # claims OUT, runs nothing
    assert claimed.returncode == 4, claimed.stderr
    storage = open_storage(out, endpoint_url=endpoint_of(flags))
    storage.put("images/00000/t0.png", b"NOT AN IMAGE")

    result = run_cli("submit", manifest, "--out", out, *FAST, *flags)
    assert result.returncode == 3, result.stderr
    index = {r["id"]: r for r in pq.read_table(io.BytesIO(storage.get("index.parquet"))).to_pylist()}
    assert index["t0"]["status"] == "failed"
    assert "images/00000/t0.png already holds an object that is not this row's image" in index["t0"]["error"]
    assert [index[i]["status"] for i in ("t1", "t2", "t3")] == ["ok"] * 3
    assert storage.get("images/00000/t0.png") == b"NOT AN IMAGE"  # left as found, never certified

    verify = run_cli("verify", out, *flags)
    assert verify.returncode == 1, verify.stdout
    assert "foreign 1" in said(verify) and "t0 images/00000/t0.png" in said(verify)


# --- 2. lock first, then a claim that must win ---------------------------------------------------


class RacedStorage(LocalStorage):
    """Another driver's job.json lands between this driver's read and its create."""

    def __init__(self, root: Path, other: bytes):
        super().__init__(root)
        self.other = other

    def put_new(self, key, data):
        if key == JOB_KEY and self.other:
            super().put_new(key, self.other)
            self.other = b""
        return super().put_new(key, data)


def test_a_claim_whose_create_lost_is_refused(tmp_path):
    mine = {"fingerprint": "mine", "manifest": {"source": "b", "fingerprint": "fb", "num_rows": 4},
            "spec": {}, "model": {"name": "builtin:tiny", "fingerprint": "p"}}
    theirs = {**mine, "fingerprint": "theirs", "manifest": {"source": "a", "fingerprint": "fa", "num_rows": 4}}
    storage = RacedStorage(tmp_path / "out", json.dumps(theirs).encode())
    with pytest.raises(OutputMismatch, match="already holds a different job: the manifest"):
        claim_job(storage, JobRecord.model_validate(mine))
    assert json.loads(storage.get(JOB_KEY))["fingerprint"] == "theirs"


def test_the_lock_is_taken_before_anything_is_claimed(run_cli, tmp_path):
    """A driver that cannot get the lock writes nothing, not even job.json."""
    from sdbatch.output.lock import JobLock

    out = tmp_path / "out"
    lock = JobLock.acquire(LocalStorage(out))  # a live driver on this host holds OUT
    try:
        result = run_cli("submit", write_manifest(tmp_path / "m.parquet", rows()), "--out", out, *FAST)
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr
    assert "is being written by another sdbatch driver" in said(result)
    assert not (out / JOB_KEY).exists()


# --- 3. a new job refuses objects it did not write; commits carry the fingerprint ----------------


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_new_job_refuses_an_out_holding_a_foreign_commit(kind, run_cli, tmp_path, request):
    out, flags = location(kind, tmp_path, request)
    storage = open_storage(out, endpoint_url=endpoint_of(flags))
    foreign = io.BytesIO()  # another job's commit, as any Parquet writer makes it
    pq.write_table(pa.table({"id": ["x"], "row": [0], "status": ["ok"], "key": ["images/00000/x.png"]}), foreign)
    storage.put("metadata/00000.parquet", foreign.getvalue())
    result = run_cli("submit", write_manifest(tmp_path / "m.parquet", rows()), "--out", out, *FAST, *flags)
    assert result.returncode == 2, result.stderr
    assert "holds 1 objects that no sdbatch job there wrote (metadata/00000.parquet)" in said(result)
    assert storage.list("") == ["metadata/00000.parquet"]  # nothing written, nothing deleted


def test_a_commit_without_this_jobs_fingerprint_is_not_trusted(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    storage.put("metadata/00000.parquet", records_to_parquet([{"id": "x", "row": 0}], index_schema({}), "another-job"))
    with pytest.raises(OutputMismatch, match="was not written by this job .it carries fingerprint 'another-job'"):
        read_shard_index(storage, "00000", "this-job")
    with pytest.raises(OutputMismatch, match="carries fingerprint 'another-job'"):  # the --retry-failed/--repair read
        read_commit(storage, "00000", "this-job")
    unstamped = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "row": [0]}), unstamped)
    storage.put("metadata/00001.parquet", unstamped.getvalue())
    with pytest.raises(OutputMismatch, match="carries fingerprint 'none'"):
        read_shard_index(storage, "00001", "this-job")


# --- 5. --new-run deletes only what the old job owns; no link is followed out of OUT -------------


def test_new_run_needs_a_job_and_deletes_only_what_its_commits_name(run_cli, tmp_path):
    out = tmp_path / "out"
    users = {"images/vacation/beach.jpg": b"sand", "metadata/notes.txt": b"mine", "shards/backup.tar": b"tar",
             "index.parquet": b"my own table"}
    for key, data in users.items():
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        (out / key).write_bytes(data)
    manifest = write_manifest(tmp_path / "m.parquet", rows())
    refused = run_cli("submit", manifest, "--out", out, *FAST, "--new-run")
    assert refused.returncode == 2, refused.stderr
    assert "holds no sdbatch job" in said(refused)
    assert {k: (out / k).read_bytes() for k in users} == users

    job_out = tmp_path / "job"
    assert run_cli("submit", manifest, "--out", job_out, *FAST).returncode == 0
    (job_out / "images" / "vacation").mkdir()
    (job_out / "images" / "vacation" / "beach.jpg").write_bytes(b"sand")
    replaced = run_cli("submit", write_manifest(tmp_path / "b.parquet", rows(prefix="b")), "--out", job_out,
                       *FAST, "--new-run")
    assert replaced.returncode == 2, replaced.stderr  # the user's file is kept, so the new job is refused
    assert "images/vacation/beach.jpg" in said(replaced)
    left = sorted(p.relative_to(job_out).as_posix() for p in job_out.rglob("*")
                  if p.is_file() and ".sdbatch-tmp-" not in p.name)
    assert left == ["images/vacation/beach.jpg"]  # every object of the old job went, nothing else


@pytest.mark.parametrize("link", ["images", "images/00000"])
def test_local_storage_never_follows_a_link_out_of_out(link, run_cli, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("not sdbatch's")
    out = tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(out)
    for call in (lambda: storage.put("images/00000/keep.txt", b"x"), lambda: storage.delete("images/00000/keep.txt"),
                 lambda: storage.put_new("images/00000/a.png", b"x"), lambda: storage.get("images/00000/keep.txt")):
        with pytest.raises(StorageConfigError, match="outside the output directory"):
            call()
    result = run_cli("submit", write_manifest(tmp_path / "m.parquet", rows()), "--out", out, *FAST)
    assert result.returncode == 2, result.stderr
    assert "sdbatch never follows links out of OUT" in said(result)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


# --- 6/7. s3 models and manifests are pinned by content -----------------------------------------


def upload(endpoint: str, bucket: str, key: str, data: bytes) -> None:
    s3(endpoint).put_object(Bucket=bucket, Key=key, Body=data)


def same_size_parquet(prompts: list[str]) -> bytes:
    """Plain-encoded, uncompressed, no statistics: changing a prompt to one of the same length
    changes neither the file size nor the footer."""
    sink = io.BytesIO()
    table = pa.table({"id": [f"m{i}" for i in range(len(prompts))], "prompt": prompts, "seed": list(range(len(prompts)))})
    pq.write_table(table, sink, use_dictionary=False, compression="none", write_statistics=False)
    return sink.getvalue()


@pytest.mark.slow
def test_a_resume_with_a_changed_s3_manifest_or_model_is_refused(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    flags = ["--s3-endpoint", endpoint]
    original = same_size_parquet([f"a red circle {i}" for i in range(4)])
    upload(endpoint, bucket, "in/m.parquet", original)
    model = tmp_path / "tiny"
    shutil.copytree(resolve_builtin("builtin:tiny"), model)
    for path in model.rglob("*"):
        if path.is_file():
            upload(endpoint, bucket, f"models/tiny/{path.relative_to(model).as_posix()}", path.read_bytes())
    fast = [*FAST[2:], "--model", f"s3://{bucket}/models/tiny", *flags]
    out = f"s3://{bucket}/out"
    first = run_cli("submit", f"s3://{bucket}/in/m.parquet", "--out", out, *fast)
    assert first.returncode == 0, first.stderr
    job = json.loads(s3(endpoint).get_object(Bucket=bucket, Key="out/_sdbatch/job.json")["Body"].read())
    assert job["model"]["fingerprint"].startswith("s3-etags:")

    changed = same_size_parquet([f"a red circle {i}" if i != 2 else "a red square 2" for i in range(4)])
    assert len(changed) == len(original) and changed != original
    upload(endpoint, bucket, "in/m.parquet", changed)
    refused = run_cli("submit", f"s3://{bucket}/in/m.parquet", "--out", out, *fast)
    assert refused.returncode == 2, refused.stderr
    assert "already holds a different job: the manifest" in said(refused)

    upload(endpoint, bucket, "in/m.parquet", original)
    config = (model / "scheduler" / "scheduler_config.json").read_bytes()
    upload(endpoint, bucket, "models/tiny/scheduler/scheduler_config.json", config + b"\n")
    refused = run_cli("submit", f"s3://{bucket}/in/m.parquet", "--out", out, *fast)
    assert refused.returncode == 2, refused.stderr
    assert f"the model 's3://{bucket}/models/tiny' (pinned {job['model']['fingerprint']}" in said(refused)


def test_a_worker_that_loaded_another_model_gets_no_shard():
    from sdbatch.run.driver import WorkerStartError, check_worker_model

    job = JobRecord(fingerprint="f", spec={}, manifest={"source": "m", "fingerprint": "fm", "num_rows": 1},
                    model={"name": "s3://b/m", "fingerprint": "s3-etags:aaa"})
    check_worker_model({"worker": "w", "model_pin": "s3-etags:aaa"}, job)
    with pytest.raises(WorkerStartError, match="the model changed since"):
        check_worker_model({"worker": "w", "model_pin": "s3-etags:bbb"}, job)


# --- models: one pickle policy, the family at preflight, every file fingerprinted ---------------


def model_copy(tmp_path: Path, name: str = "tiny") -> Path:
    folder = tmp_path / name
    shutil.copytree(resolve_builtin("builtin:tiny"), folder)
    return folder


def test_pickles_are_refused_alike_in_local_and_s3_folders(run_cli, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    folder = model_copy(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")  # next to the safetensors
    for path in folder.rglob("*"):
        if path.is_file():
            upload(endpoint, bucket, f"m/{path.relative_to(folder).as_posix()}", path.read_bytes())
    manifest = write_manifest(tmp_path / "m.parquet", rows())
    messages = []
    for model in (str(folder), f"s3://{bucket}/m"):
        result = run_cli("submit", manifest, "--out", tmp_path / "out", *FAST[2:], "--model", model,
                         "--s3-endpoint", endpoint)
        assert result.returncode == 2, result.stderr
        messages.append(said(result).replace(model, "MODEL"))
        assert not (tmp_path / "out").exists()
    assert messages[0] == messages[1]
    assert "contains pickle checkpoint files (unet/diffusion_pytorch_model.bin)" in messages[0]


def test_an_unsupported_family_exits_2_before_any_worker_starts(run_cli, tmp_path):
    folder = model_copy(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    result = run_cli("submit", write_manifest(tmp_path / "m.parquet", rows()), "--out", tmp_path / "out",
                     *FAST[2:], "--model", folder)
    assert result.returncode == 2, result.stderr
    from sdbatch.models.families import FAMILIES

    assert "names pipeline class 'KandinskyPipeline', which sdbatch does not run; supported: StableDiffusionPipeline, " in said(result)
    assert all(name in said(result) for name in FAMILIES), said(result)  # every family's pipeline class is named
    assert not (tmp_path / "out").exists()


def test_a_model_with_custom_component_code_exits_2_before_anything_is_written(run_cli, tmp_path):
    """Issue 21 finding 18: custom code in a model folder — a component from a module of its own,
    a ``*.py`` file, a config's ``auto_map`` — is refused at submit, naming it; OUT is not made."""
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))

    def submit(folder):
        result = run_cli("submit", manifest, "--out", tmp_path / "out", *FAST[2:], "--model", folder)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
        return said(result)

    custom = model_copy(tmp_path, "custom-unet")
    index = json.loads((custom / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, "unet": ["my_unet", "MyUNet"]}))
    assert (f"model at {custom}: model_index.json component 'unet' is 'MyUNet' from 'my_unet', custom code rather "
            "than a class of diffusers or transformers; sdbatch runs no code shipped with a model") in submit(custom)

    shipped = model_copy(tmp_path, "shipped-code")
    (shipped / "unet" / "my_unet.py").write_text("import os\n")
    assert f"model at {shipped} ships Python code (unet/my_unet.py)" in submit(shipped)

    mapped = model_copy(tmp_path, "auto-map")
    config = json.loads((mapped / "text_encoder" / "config.json").read_text())
    (mapped / "text_encoder" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert f"model at {mapped}: text_encoder/config.json has an auto_map" in submit(mapped)


def test_the_fingerprint_covers_every_file_of_every_component(tmp_path):
    from sdbatch.models.errors import ModelError
    from sdbatch.models.resolve import preflight

    folder = model_copy(tmp_path)
    before = fingerprint_model_dir(folder)
    assert before == fingerprint_model_dir(resolve_builtin("builtin:tiny"))  # wherever it lives
    (folder / "tokenizer" / "spiece.model").write_bytes(b"a sentencepiece model")
    assert fingerprint_model_dir(folder) != before
    assert preflight(str(folder)).pin == fingerprint_model_dir(folder)
    null = preflight("builtin:null")  # the numpy model's class is supported, and it is pinned too
    assert null.pin == fingerprint_model_dir(resolve_builtin("builtin:null")) != before
    with pytest.raises(ModelError, match="no model_index.json"):
        preflight(str(tmp_path))


def test_a_component_folder_behind_a_symbolic_link_is_pinned_by_what_it_holds(run_cli, tmp_path):
    """Issue 21 finding 8: the loader reads through a linked component folder, so the pin does
    too — a UNet switched behind the link between a run and its resume is a changed model; a
    link loop is refused, naming the link."""
    folder = model_copy(tmp_path)
    (folder / "unet").rename(tmp_path / "unet-v1")
    shutil.copytree(tmp_path / "unet-v1", tmp_path / "unet-v2")
    config = json.loads((tmp_path / "unet-v2" / "config.json").read_text())
    (tmp_path / "unet-v2" / "config.json").write_text(json.dumps({**config, "norm_eps": 1e-6}))
    (folder / "unet").symlink_to(tmp_path / "unet-v1", target_is_directory=True)
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    first = run_cli("submit", manifest, "--out", tmp_path / "out", *FAST[2:], "--model", folder)
    assert first.returncode == 0, first.stderr

    (folder / "unet").unlink()
    (folder / "unet").symlink_to(tmp_path / "unet-v2", target_is_directory=True)
    resumed = run_cli("submit", manifest, "--out", tmp_path / "out", *FAST[2:], "--model", folder)
    assert resumed.returncode == 2, resumed.stderr
    assert f"already holds a different job: the model {str(folder)!r} (pinned" in said(resumed)

    (tmp_path / "unet-v2" / "loop").symlink_to(folder, target_is_directory=True)
    looped = run_cli("submit", manifest, "--out", tmp_path / "out2", *FAST[2:], "--model", folder)
    assert looped.returncode == 2 and "Traceback" not in looped.stderr
    assert f"unet/loop is a symbolic link to {folder}, a folder that contains it (a loop)" in said(looped)
    assert not (tmp_path / "out2").exists()


# --- 8. the local cluster listens on loopback only ------------------------------------------------


#: the command lines of Ray's head services a job-local cluster does without (``run.cluster.SKIPPED_HEAD_SERVICES``):
#: the autoscaler monitor, the dashboard head (not its agent: ``dashboard/agent.py``) and the log monitor
SKIPPED_HEAD_SERVICES = ("/autoscaler/_private/monitor.py", "/dashboard/dashboard.py", "/_private/log_monitor.py")


@pytest.mark.slow
def test_a_local_cluster_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", RAY_SINGLE_MACHINE)}  # the CLI's to set
    manifest = write_manifest(tmp_path / "m.parquet", rows(6))
    driver = subprocess.Popen([sys.executable, "-m", "sdbatch", "submit", manifest, "--out", tmp_path / "out",
                               *FAST, "--set", "resources.cpus_per_worker=1"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening: dict[tuple[str, str], set[str]] = {}
    parent = psutil.Process(driver.pid)
    seen: dict[int, psutil.Process] = {}  # every process of the job's cluster, for the check at exit
    head_services = []  # commands of Ray's head services a job-local cluster does without, whenever one ran
    while driver.poll() is None:
        try:
            family = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        commands = []
        for proc in family:
            seen.setdefault(proc.pid, proc)
            try:
                commands.append(" ".join(proc.cmdline()))
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listening.setdefault((proc.name(), conn.laddr.ip), set()).add(str(conn.laddr.port))
            except psutil.Error:
                continue
        head_services += [c for c in commands if any(service in c for service in SKIPPED_HEAD_SERVICES)]
        time.sleep(0.2)
    stdout, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 0, stderr
    # the job-local cluster starts no autoscaler monitor, dashboard head or log monitor (run.cluster)
    assert not head_services, head_services
    # and the CLI's exit (ray.shutdown, run first by sdbatch's own exit handler) leaves none of its processes
    _, alive = psutil.wait_procs([p for pid, p in seen.items() if pid != driver.pid], timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    # sdbatch asks for token authentication itself: Ray's "Token authentication is enabled" warning stays off the console
    assert "Token authentication" not in stdout + stderr and "authentication_token_setup" not in stderr, stderr
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), listening
    assert {ip for _, ip in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def test_a_local_cluster_without_authentication_needs_an_opt_in(run_cli, tmp_path):
    env = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    result = run_cli("submit", write_manifest(tmp_path / "m.parquet", rows()), "--out", tmp_path / "out", *FAST,
                     env=env)
    assert result.returncode == 2, result.stderr
    assert "RAY_AUTH_MODE=disabled" in said(result) and "--allow-unauthenticated-ray" in said(result)
    assert not (tmp_path / "out").exists()


# --- 9. init images only from the job's own places -----------------------------------------------


def img2img_rows(*paths: str) -> list[dict]:
    return [{"id": f"i{i}", "prompt": "a red circle", "seed": i, "init_image": p, "strength": 0.5}
            for i, p in enumerate(paths)]


def test_init_images_outside_the_manifests_folder_or_buckets_are_refused(run_cli, s3_bucket, tmp_path):
    _, bucket = s3_bucket
    folder = tmp_path / "data"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(folder / "ok.png")  # there: validate's missing-file warning does not name it
    manifest = write_manifest(folder / "m.parquet", img2img_rows(
        "../../../../../../etc/hostname", "~/.bashrc", "s3://someone-elses-bucket/x.png", "ok.png",
        f"s3://{bucket}/in/ok.png"))
    out = f"s3://{bucket}/out"
    result = run_cli("submit", manifest, "--out", out, *FAST, "--s3-endpoint", s3_bucket[0])
    assert result.returncode == 2, result.stderr
    text = said(result)
    assert "row 0 (id i0): init_image '../../../../../../etc/hostname' resolves to /etc/hostname" in text
    assert f"row 1 (id i1): init_image '~/.bashrc' resolves to {os.path.realpath(os.path.expanduser('~/.bashrc'))}" in text
    assert "row 2 (id i2): init_image 's3://someone-elses-bucket/x.png'" in text
    assert "id i3" not in text and "id i4" not in text  # under the manifest's folder; OUT's bucket
    assert "limits.init_image_roots" in text
    assert s3(s3_bucket[0]).list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_init_image_roots_widen_the_places_explicitly(tmp_path):
    from sdbatch.manifest.init_roots import check_init_image_roots
    from sdbatch.manifest.sources import ManifestError, open_manifest
    from sdbatch.spec import load_spec

    (tmp_path / "data").mkdir()
    manifest = open_manifest(str(write_manifest(tmp_path / "data" / "m.parquet", img2img_rows(
        str(tmp_path / "shared" / "a.png"), "s3://shared-bucket/init/b.png"))))
    with pytest.raises(ManifestError, match="row 0 .id i0.*\n.*row 1 .id i1"):
        check_init_image_roots(manifest, load_spec(None, [], {}), [str(tmp_path / "out")])
    roots = json.dumps([str(tmp_path / "shared"), "s3://shared-bucket/init"])
    check_init_image_roots(manifest, load_spec(None, [f"limits.init_image_roots={roots}"], {}), [str(tmp_path / "out")])
