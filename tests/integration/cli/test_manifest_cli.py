"""The manifest through a process and through S3: ``sdbatch validate`` and ``submit`` as a
subprocess (exit 2, no traceback, nothing written), an ``s3://`` manifest file and prefix on the
moto server, and the validation path importing no torch. The in-process cases are
tests/unit/manifest/test_manifest.py, whose helpers these use."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from unit.manifest.test_manifest import check, find, write

from sdbatch.manifest.reader import read_rows
from sdbatch.manifest.sources import ManifestError, open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.spec import JobSpec


def _sdbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("dup_ids", "column 'id': value 'a' — rule: ids must be unique (also used by row 0)"),
        ("width_513", "column 'width': value 513 — rule: width must be a multiple of 8"),
        ("nan_guidance", "column 'guidance_scale': value nan — rule: guidance_scale must be finite"),
        ("not_parquet", "not a readable Parquet file"),
        ("no_prompt", "required column 'prompt' is missing"),
    ],
)
def test_cli_subprocess_bad_inputs_exit_2(tmp_path, case, expect):
    p = tmp_path / "m.parquet"
    if case == "dup_ids":
        write(p, id=["a", "b", "a"])
    elif case == "width_513":
        write(p, width=[64, 513])
    elif case == "nan_guidance":
        write(p, guidance_scale=[math.nan])
    elif case == "not_parquet":
        p.write_text("prompt\na cat\n")
    elif case == "no_prompt":
        pq.write_table(pa.table({"caption": ["x"]}), p)
    res = _sdbatch("validate", str(p), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert expect in res.stderr
    assert "Traceback" not in res.stderr
    assert "torch" not in res.stderr


def test_cli_subprocess_good_manifest(tmp_path):
    res = _sdbatch("validate", write(tmp_path / "m.parquet", prompt=["a"]), cwd=tmp_path)
    assert res.returncode == 0 and "OK" in res.stdout


def test_cli_submit_bad_manifest_writes_nothing(tmp_path):
    p = write(tmp_path / "m.parquet", steps=[0])
    out = tmp_path / "out"
    res = _sdbatch("submit", p, "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "column 'steps'" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() or not any(out.rglob("*"))


# --- s3:// manifests ---------------------------------------------------------------------------------


def test_s3_manifest_file_and_prefix(s3_bucket, monkeypatch, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for name, ids in (("a.parquet", ["a", "b"]), ("b.parquet", ["c", "a"])):
        local = write(tmp_path / name, id=ids, init_image=["img/x.png", None])
        client.upload_file(local, bucket, f"man/{name}")
    client.put_object(Bucket=bucket, Key="man/_SUCCESS", Body=b"")

    one = open_manifest(f"s3://{bucket}/man/a.parquet")
    assert one.num_rows == 2 and one.base_dir == f"s3://{bucket}/man"
    rows = read_rows(one, JobSpec(), 0, 2)
    assert rows[0].init_image == f"s3://{bucket}/man/img/x.png" and rows[1].id == "b"
    assert check(f"s3://{bucket}/man/a.parquet").ok

    prefix = open_manifest(f"s3://{bucket}/man")
    assert prefix.files == (f"s3://{bucket}/man/a.parquet", f"s3://{bucket}/man/b.parquet")
    find(validate_manifest(prefix, JobSpec()), 3, "id", "also used by row 0")
    assert open_manifest(f"s3://{bucket}/man/*.parquet").num_rows == 4
    with pytest.raises(ManifestError):
        open_manifest(f"s3://{bucket}/nothing-here")


def test_validation_path_does_not_import_torch():
    code = (
        "import sys; import sdbatch.manifest.validate, sdbatch.cli.manifest_commands, sdbatch.manifest.builder; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'ray')], 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
