"""Shared pytest fixtures: a real local Ray cluster, a real S3-compatible server (moto), CLI runner.

Each section below is owned by the module it serves; add fixtures to the matching section.
"""

from __future__ import annotations

# --- S3 (moto ThreadedMotoServer on 127.0.0.1) ------------------------------------------------
import pytest as _pytest_s3

_S3_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/sdbatch-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sdbatch-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _serialise_conditional_puts(mp) -> None:
    """moto 5.2 evaluates ``If-None-Match`` / ``If-Match`` on PutObject and then writes, with
    no lock between the two: a thread switch in between lets two racing conditional PUTs both
    succeed (rare — none in 200 eight-way races here — but possible), where S3 decides them
    atomically. One lock around moto's PutObject handler gives the tests S3's semantics, so
    the create-once and compare-and-swap races they run cannot flake."""
    import threading

    from moto.s3.responses import S3Response

    handler = S3Response.put_object
    lock = threading.Lock()

    def put_object(self):
        with lock:
            return handler(self)

    mp.setattr(S3Response, "put_object", put_object)


@_pytest_s3.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL.

    Sets fake credentials in os.environ for the session (inherited by subprocesses and
    local Ray workers); does NOT set AWS_ENDPOINT_URL (pass the endpoint explicitly).
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    mp = _pytest_s3.MonkeyPatch()
    for k, v in _S3_FAKE_ENV.items():
        mp.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    _serialise_conditional_puts(mp)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        from sdbatch.storage import s3_client as _storage

        _storage.clear_client_cache()
    except ImportError:  # pragma: no cover
        pass
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


@_pytest_s3.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session's moto server: yields (endpoint_url, bucket)."""
    import uuid

    import boto3

    bucket = f"sdbatch-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield s3_server, bucket


@_pytest_s3.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests on a LocalStorage directory and on an S3Storage prefix of a fresh bucket."""
    from sdbatch.storage.local import LocalStorage
    from sdbatch.storage.s3 import S3Storage

    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(f"s3://{bucket}/runs/job1", endpoint_url=endpoint)


# --- Ray ---------------------------------------------------------------------------------------
import functools as _functools
import hashlib as _hashlib
import os as _os
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path

import pyarrow as _pa
import pyarrow.parquet as _pq

REPO = _Path(__file__).resolve().parents[1]
# the toy-model tools (tools/shapes) live beside the package, not in it
if str(REPO) not in _sys.path:
    _sys.path.insert(0, str(REPO))


# Loopback only, as sdbatch's own local cluster (``job.preflight.local_ray_environment``): Ray turns
# ``_node_ip_address="127.0.0.1"`` into the host's address unless its single-machine mode is
# on. Set before ray is imported here (Ray reads it then) and inherited by the session
# cluster and every driver the tests start against it (a driver without it looks for a node
# at the host's address and waits forever). Tests of the CLI's own local cluster remove it.
RAY_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_os.environ[RAY_SINGLE_MACHINE] = "0"


@_pytest_s3.fixture(scope="session")
def ray_address(s3_server):
    """One real local Ray cluster for the whole session, on loopback. Its worker processes
    inherit the environment of this moment, so the fake AWS credentials are set first."""
    import ray

    # "local": a cluster of the session's own, not the last one a `ray start` left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


# --- CLI ---------------------------------------------------------------------------------------


def sdbatch_cli(ray_address: str, *args, timeout: float = 600, env: dict | None = None,
                **kwargs) -> _subprocess.CompletedProcess:
    """Run ``python -m sdbatch ARGS`` as a user would, against the Ray cluster at ``ray_address``
    (module-scoped fixtures call this; tests use ``run_cli``). An ``env`` asking for test
    faults runs it through tests/integration/faulty_sdbatch.py (``faults.sdbatch_command``)."""
    from integration.faults import sdbatch_command

    full_env = {**_os.environ, "RAY_ADDRESS": ray_address, **(env or {})}
    return _subprocess.run(
        [*sdbatch_command(env), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO, **kwargs,
    )


def submit_jobs(ray_address: str, manifest: _Path, root: _Path, runs: dict[str, list], *common) -> dict[str, _Path]:
    """One ``submit MANIFEST --out ROOT/NAME *common *args`` per NAME, args in ``runs``, two at a
    time on the session cluster's two CPUs (a tiny job is mostly its processes starting); each
    must succeed. NAME -> its output folder."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(sdbatch_cli, ray_address, "submit", manifest, "--out", root / name, *common, *args)
                   for name, args in runs.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr)
    return {name: root / name for name in runs}


def assert_refused(ray_address: str, manifest: _Path, out: _Path, cases: list[tuple[list, str]]) -> None:
    """Each case's ``submit MANIFEST --out OUT --dry-run *args`` exits 2 saying its message,
    without a traceback: (args, message) per case. Two at a time, as ``submit_jobs``."""
    from concurrent.futures import ThreadPoolExecutor

    def dry_run(args: list):
        return sdbatch_cli(ray_address, "submit", manifest, "--out", out, "--dry-run", *args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(dry_run, [args for args, _ in cases]))
    for (args, message), result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


@_pytest_s3.fixture
def run_cli(ray_address):
    """``sdbatch_cli`` against the session's Ray cluster."""
    return _functools.partial(sdbatch_cli, ray_address)


def write_manifest(path: _Path, rows: list[dict]) -> _Path:
    _pq.write_table(_pa.Table.from_pylist(rows), path)
    return path


def load_index(out: _Path) -> list[dict]:
    return _pq.read_table(out / "index.parquet").to_pylist()


def image_hashes(out: _Path) -> dict[str, str]:
    """id -> sha256 of each stored image, checked against the index on the way."""
    hashes = {}
    for r in load_index(out):
        digest = _hashlib.sha256((out / r["key"]).read_bytes()).hexdigest()
        assert digest == r["sha256"], r["id"]
        hashes[r["id"]] = digest
    return hashes


def stored_pixels(out: _Path, entry: dict):
    """The RGB pixels (numpy) of the image an index ``entry`` of ``out`` names."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(out / entry["key"]).convert("RGB"))


def assert_reproduces(out: _Path, *row_ids: str) -> None:
    """``reproduce_row`` (what ``sdbatch reproduce`` runs) renders each row of ``out`` byte for byte."""
    from sdbatch.audit.reproduce import reproduce_row

    for row_id in row_ids:
        result = reproduce_row(str(out), row_id)
        assert result.match, (row_id, result.summary(), result.notes)


def small_rows() -> list[dict]:
    """24 text-to-image rows with explicit seeds and a passthrough label."""
    return [
        {
            "id": f"r{i:02d}",
            "prompt": f"a {'small' if i % 2 else 'large'} {['red', 'green', 'blue'][i % 3]} circle, white background",
            "negative_prompt": "black" if i % 4 == 0 else "",
            "seed": 100 + i,
            "label": i % 3,
        }
        for i in range(24)
    ]


@_pytest_s3.fixture
def small_manifest(tmp_path):
    return write_manifest(tmp_path / "manifest.parquet", small_rows())


# --- models --------------------------------------------------------------------------------------


@_pytest_s3.fixture(scope="module")
def tiny_generator():
    """``builtin:tiny`` loaded in this process, for tests that run a ShardRunner without Ray."""
    from sdbatch.models.runtime import load_model

    return load_model("builtin:tiny", device="cpu", dtype="auto")


# --- property tests (hypothesis) ------------------------------------------------------------------
from hypothesis import settings as _hypothesis_settings

# no per-example deadline: the machines that run the suite are shared and a first example pays
# for imports, so a time limit would fail a property for how busy the machine was
_hypothesis_settings.register_profile("sdbatch", deadline=None)
_hypothesis_settings.load_profile("sdbatch")


# --- test order (pytest-xdist) ------------------------------------------------------------------
@_pytest_s3.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Files with a slow test first, each file's tests kept together and in order. xdist hands a
    worker the next file in this order when it has two tests left (``--dist loadfile`` with
    ``--no-loadscope-reorder``; its default order, by number of tests, put the one- and two-test
    files of two minutes each last, where one worker ran them while the other had nothing left)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keep their order


# --- process exit ------------------------------------------------------------------------------
@_pytest_s3.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave as ``sdbatch.cli.main`` does: after the atexit handlers, through ``os._exit`` with
    pytest's exit status. pyarrow's thread pool can abort a process during interpreter
    finalisation (apache/arrow#34314), which would turn a green run's exit 0 into -6."""
    import atexit

    session = getattr(config, "_sdbatch_session", None)
    if session is None:  # unconfigured before a session ran (``--help``, usage errors)
        return
    atexit._run_exitfuncs()
    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(int(session.exitstatus))


def pytest_sessionstart(session):
    session.config._sdbatch_session = session
