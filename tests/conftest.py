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
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        from sdbatch import storage as _storage

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


# --- Ray ---------------------------------------------------------------------------------------

# --- CLI ---------------------------------------------------------------------------------------
