"""Deployment files and the operator's command line, checked against the real tools: hadolint
on the Dockerfile, kubernetes-validate on the built-in kinds of infra/kuberay/ (and on the pod
templates inside the RayJob and RayCluster), the RayJob's entrypoint run with ``--dry-run``
on a local manifest, the Grafana dashboard against the metrics the code exports, the usage
line ``sdbatch submit manifest.parquet`` without ``--out``, and ``--dry-run`` itself."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, load_index, small_rows, write_manifest

KUBERAY = REPO / "infra" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:1"}  # a dry run must not need (or start) Ray


def cli(*args, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "sdbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# --- containers --------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--failure-threshold", "info", "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_a_cpu_build_argument():
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime-", text, re.M)  # CUDA runtime by default
    assert re.search(r"^ARG TORCH_INDEX=\S+/cu\d+$", text, re.M)  # ... with the matching torch build
    assert "--build-arg BASE_IMAGE=ubuntu" in text and "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r'^ENTRYPOINT \["sdbatch"\]', text, re.M)


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or
                   (p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in parts)) for p in patterns)

    copied = [src for line in re.findall(r"^COPY (.+)$", (REPO / "Dockerfile").read_text(), re.M)
              for src in line.split()[:-1]]
    assert copied and not [src for src in copied if ignored(src)]
    for path in (".git", "tests/test_infra.py", "out/x.png", "sdbatch/__pycache__/cli.cpython-311.pyc", "runs/a"):
        assert ignored(path), path


# --- KubeRay -----------------------------------------------------------------------------------


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_manifest_parses_and_built_in_kinds_validate():
    docs = documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayJob", "RayCluster", "CronJob"} <= kinds
    version = kubernetes_validate.latest_version()
    for _, doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            # the CRDs are KubeRay's; their pod templates are Kubernetes' own PodTemplateSpec
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            for group in groups:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                              "template": group["template"]}, version, strict=True)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def _rayjob() -> dict:
    return next(doc for _, doc in documents() if doc["kind"] == "RayJob")


def test_rayjob_shape():
    job = _rayjob()["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
    cluster = job["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # CPU head: no model replica
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert job["submissionMode"] == "SidecarMode"  # reaches the loopback-bound Jobs API from inside the pod
    for head in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"  # one replica per GPU
    args = shlex.split(job["entrypoint"])
    assert args[:2] == ["sdbatch", "submit"] and args[2].startswith("s3://")
    assert args[args.index("--out") + 1].startswith("s3://")
    assert int(args[args.index("--workers") + 1]) == gpu["replicas"]
    assert args[args.index("--gpus-per-worker") + 1] == "1"


def test_nightly_cronjob_creates_the_rayjob():
    cron = next(doc for _, doc in documents() if doc["kind"] == "CronJob")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"] == ["create", "-f", "/config/rayjob.yaml"]
    assert pod["initContainers"][0]["args"][:3] == ["delete", "rayjob", _rayjob()["metadata"]["name"]]
    role = next(doc for _, doc in documents() if doc["kind"] == "Role")
    assert {"create", "delete"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["rayjobs"]


def test_rayjob_entrypoint_is_accepted_by_the_real_cli(tmp_path):
    """The entrypoint's own arguments, with each s3:// location swapped for a local one."""
    manifest = write_manifest(tmp_path / "night.parquet", small_rows())
    args = shlex.split(_rayjob()["spec"]["entrypoint"])[1:]
    local = {args[1]: str(manifest), args[args.index("--out") + 1]: str(tmp_path / "out")}
    if "--model" in args:
        local[args[args.index("--model") + 1]] = "builtin:tiny"
    swapped = [local.get(a, a) for a in args]
    assert not [a for a in swapped if a.startswith("s3://")]
    done = cli(*swapped, "--dry-run", env=NO_RAY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shards     1 of up to 64 rows" in done.stdout
    assert not (tmp_path / "out").exists()


# --- Grafana -----------------------------------------------------------------------------------


def test_grafana_dashboard_shows_every_metric_and_only_real_ones():
    from sdbatch.run.metrics import METRICS

    dashboard = json.loads((REPO / "infra" / "grafana" / "sdbatch.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"ray_(sdbatch_[a-z_]+?)(?:_total|_bucket|_count|_sum)?\{", exprs))
    assert used == set(METRICS)


# --- the usage line and --dry-run ----------------------------------------------------------------


def usage_rows() -> list[dict]:
    """Six good rows and one whose init image is not an image: it fails, the job exits 3."""
    good = [{**r, "init_image": None, "strength": None} for r in small_rows()[:6]]
    return [*good, {**good[0], "id": "broken", "init_image": "broken.png", "strength": 0.5}]


@pytest.fixture(scope="module")
def usage_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("usage")
    write_manifest(folder / "manifest.parquet", usage_rows())
    (folder / "broken.png").write_bytes(b"not a PNG")
    return folder


@pytest.fixture(scope="module")
def usage_run(usage_dir, ray_address):
    """The usage line as typed: no --out (a tiny model, to be quick)."""
    return cli("submit", "manifest.parquet", "--model", "builtin:tiny", "--steps", "2", cwd=usage_dir,
               env={"RAY_ADDRESS": ray_address})


def test_submit_without_out_writes_to_sdbatch_out_manifest_stem(usage_dir, usage_run):
    done = usage_run
    assert done.returncode == 3, done.stdout + done.stderr  # the broken row failed
    assert done.stdout.splitlines()[0] == "output → sdbatch-out/manifest"  # printed first
    out = usage_dir / "sdbatch-out" / "manifest"
    assert [r["id"] for r in load_index(out)] == [r["id"] for r in usage_rows()]
    assert f"report → {out.resolve().as_uri()}/report.html" in done.stdout
    assert (out / "report.html").is_file()
    assert "planned 1 shard, 2 batches" in done.stderr, done.stderr


def test_status_json_for_monitors(usage_dir, usage_run):
    done = cli("status", usage_dir / "sdbatch-out" / "manifest", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "finished" and status["eta_seconds"] is None
    assert (status["rows_total"], status["rows_done"], status["rows_failed"], status["rows_remaining"]) == (7, 6, 1, 0)
    (worker,) = status["per_worker"].values()  # one worker ran every row
    assert (worker["rows_done"], worker["rows_failed"]) == (6, 1) and worker["images_per_second"] > 0
    assert "history" not in status["progress"]


def test_report_command_lists_failures_and_prices_images(usage_dir, usage_run):
    assert usage_run.returncode == 3, usage_run.stderr
    out = usage_dir / "sdbatch-out" / "manifest"
    done = cli("report", out, "--gpu-hour-usd", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    html = (out / "report.html").read_text()
    shown = dict(re.findall(r'<td class="num" id="([a-z0-9-]+)">([^<]*)</td>', html))
    success = json.loads((out / "_SUCCESS").read_text())
    assert (shown["rows-ok"], shown["rows-failed"]) == ("6", "1") == (str(success["rows_ok"]), str(success["rows_failed"]))
    per_worker_hour = success["rows_generated_this_run"] / (success["wall_seconds_this_run"] / 3600)  # 1 CPU worker
    assert shown["images-per-device-hour"] == f"{per_worker_hour:.0f}"
    assert "images per worker-hour (1 worker)</td>" in html
    assert shown["cost-per-1000"] == f"${1000 * 2 / per_worker_hour:.4f}"
    failures = re.search(r'<table id="failures">(.*?)</table>', html, re.S).group(1)
    assert "<td>broken</td>" in failures and "cannot identify the image format of its 9 bytes" in failures
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 6  # the contact sheet: ok rows only


def test_submit_without_out_uses_the_specs_output_location(usage_dir):
    spec = usage_dir / "job.yaml"
    spec.write_text(f"output:\n  location: {usage_dir / 'from-spec'}\n")
    done = cli("submit", "manifest.parquet", "--spec", spec, "--dry-run", cwd=usage_dir, env=NO_RAY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == f"output → {usage_dir / 'from-spec'}  (dry run: nothing is written)"
    assert not (usage_dir / "from-spec").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    rows = [{**r, "steps": 4 if i < 10 else 6} for i, r in enumerate(small_rows())]  # two batch groups
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    done = cli("submit", manifest, "--out", tmp_path / "out", "--rows-per-shard", 16, "--batch-size", 4,
               "--dry-run", env=NO_RAY)
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout
    # shard 0: rows 0-9 (steps 4) → 3 batches, rows 10-15 (steps 6) → 2; shard 1: 8 rows → 2
    assert "shards     2 of up to 16 rows; 0 already committed, 2 to generate (24 rows)" in said
    assert "batches    7 of up to 4 rows; fill ratio 0.857" in said
    assert "family     StableDiffusionPipeline: 24 rows" in said
    assert "estimate   no rate known yet" in said
    assert list(tmp_path.iterdir()) == [manifest]


def test_dry_run_names_the_workers_the_model_and_the_image_sizes(tmp_path):
    rows = [{**r, "width": 64 if i < 20 else 72, "height": 64} for i, r in enumerate(small_rows())]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    done = cli("submit", manifest, "--out", tmp_path / "out", "--rows-per-shard", 16, "--workers", 3,
               "--dry-run", env=NO_RAY)
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout
    assert ("workers    2 workers (3 asked for: no more than the shards to generate), "
            "fewer if the cluster cannot place them") in said
    assert re.search(r"^model      builtin:shapes  \(StableDiffusionPipeline, fingerprint [0-9a-f]{64}\)$", said, re.M), said
    assert "sizes      64x64: 20 rows, 72x64: 4 rows" in said


def test_dry_run_on_an_existing_out_says_resume_or_refuse(usage_dir, usage_run, tmp_path):
    """The same job: resumes (here: finished, 0 rows left); another job: exit 2 and the reason;
    a bad manifest: the usual validation report, exit 2."""
    assert usage_run.returncode == 3, usage_run.stderr
    resumed = cli("submit", "manifest.parquet", "--model", "builtin:tiny", "--steps", "2", "--dry-run",
                  cwd=usage_dir, env=NO_RAY)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(resumes job " in resumed.stdout and "already finished" in resumed.stdout
    assert "1 already committed, 0 to generate (0 rows)" in resumed.stdout
    assert "estimate   0 s at " in resumed.stdout  # the rate the finished run measured
    other = write_manifest(tmp_path / "other.parquet", small_rows()[6:9])
    done = cli("submit", other, "--out", usage_dir / "sdbatch-out" / "manifest", "--dry-run", env=NO_RAY)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "REFUSED    " in done.stdout and "already holds a different job" in done.stdout
    bad = write_manifest(tmp_path / "bad.parquet", [{"prompt": "", "id": "x"}])
    done = cli("submit", bad, "--out", tmp_path / "o", "--dry-run", env=NO_RAY)
    assert done.returncode == 2 and "prompt" in done.stderr and not (tmp_path / "o").exists()
