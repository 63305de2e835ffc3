"""A fresh install works (issue 11): the README's first command's install into a clean virtual
environment (no system site-packages; pip's cache and local wheels are fine), then, inside it,
a job with every sampler, every image format, and the README's index snippet.

One venv for the module. The job runs on the venv's own local Ray cluster (its workers must
use the venv's interpreter), not on the session cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RAY_SINGLE_MACHINE, REPO

from sdbatch.models.families.sd import StableDiffusion

SAMPLERS = StableDiffusion.samplers

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """The environment of a new shell: nothing pointing at this checkout or the session's cluster."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONHOME", RAY_SINGLE_MACHINE)
            and not k.startswith("SDBATCH_")}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "venv"
    venv.create(root, with_pip=True, system_site_packages=False)
    # --no-compile: pip byte-compiles every .py it installs (~15,000 files, most never
    # imported), single-threaded; Python compiles what the job imports as it imports it
    install = subprocess.run(
        [root / "bin" / "pip", "install", "-q", "--no-compile", "-c", "constraints.txt", "-e", "."],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=1200,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return root


def in_venv(root: Path, *args, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**clean_env(), "PATH": f"{root / 'bin'}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=timeout)


def test_fresh_venv_is_isolated_and_imports_this_checkout(fresh_venv):
    # and what a job imports (driver, worker, model) imports from the declared dependencies;
    # this one process also byte-compiles it all, before the job's cluster processes would
    # each compile the same modules at once (pip installed with --no-compile)
    code = ("import sys, sdbatch, sdbatch.cli, sdbatch.run.driver, sdbatch.run.worker, sdbatch.models.runtime, sdbatch.audit.report; "
            "print(sdbatch.__file__); print(sys.prefix != sys.base_prefix)")
    result = in_venv(fresh_venv, fresh_venv / "bin" / "python", "-c", code, cwd=fresh_venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(REPO / "sdbatch" / "__init__.py"), "True"]
    assert not Path(sys.prefix).samefile(fresh_venv)


def test_every_sampler_and_image_format_in_a_fresh_install(fresh_venv, tmp_path):
    rows = [{"id": f"{name}-{i}", "prompt": f"a small red circle {i}", "seed": 10 + i, "scheduler": name}
            for name in SAMPLERS for i in range(2)]
    manifest = tmp_path / "all-samplers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    job = in_venv(fresh_venv, "sdbatch", "submit", manifest, "--out", out, "--model", "builtin:tiny", "--steps", "2",
                  "--workers", "1", "--rows-per-shard", str(len(rows)), "--batch-size", "2")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    # the README's index snippet (pandas), in the venv; and each image format's encoder
    snippet = f"""
import pyarrow.parquet as pq
from PIL import Image
from sdbatch.output.encode import encode_image, read_embedded
index = pq.read_table({str(out / 'index.parquet')!r}).to_pandas()
assert list(index.status.unique()) == ["ok"], index[["id", "status", "error"]].to_string()
text, record = read_embedded(open({str(out)!r} + "/" + index.key[0], "rb").read())
assert text.startswith("a small red circle") and record["id"] == index.id[0]
print(sorted(index.scheduler.unique()))
for fmt in ("png", "webp", "jpeg"):
    data = encode_image(Image.new("RGB", (64, 64), "red"), record, fmt=fmt)
    assert read_embedded(data)[1]["id"] == record["id"], fmt
"""
    check = in_venv(fresh_venv, fresh_venv / "bin" / "python", "-c", snippet)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.strip() == str(sorted(SAMPLERS))
