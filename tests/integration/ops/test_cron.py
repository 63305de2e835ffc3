"""The cron recipe of infra/README.md (issue 27), run as cron runs it: the exact crontab line
under ``/bin/sh`` with an empty environment (``env -i``), the wrapper as written, only its
paths and the job's manifest and OUT moved into a temporary folder. The venv is a folder whose
``bin/sdbatch`` is this checkout's CLI, a console script as pip writes one (pointed at this
checkout, which the test venv's editable install is not)."""

from __future__ import annotations

import fcntl
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, load_index, write_manifest

RECIPE = (REPO / "infra" / "README.md").read_text()


def recipe_in(root: Path) -> tuple[str, Path]:
    """The crontab line's command and the wrapper, with /opt/sdbatch moved to ``root``."""
    line = re.search(r"^0 22 \* \* \* (.+)$", RECIPE, re.M).group(1)
    script = re.search(r"```bash\n(#!/bin/bash\n# /opt/sdbatch/night\.sh.*?)```", RECIPE, re.S).group(1)
    manifest = write_manifest(root / "night.parquet", [{"id": f"n{i}", "prompt": f"a red circle {i}", "seed": i} for i in range(3)])
    script = (script.replace("MANIFEST=s3://b/manifests/night.parquet", f"MANIFEST={manifest}")
              .replace("OUT=s3://b/runs/night", f"OUT={root / 'out'}"))
    (root / "venv" / "bin").mkdir(parents=True)
    sdbatch = root / "venv" / "bin" / "sdbatch"
    # this checkout, for the CLI and the Ray workers it starts (the venv's own install is another's)
    sdbatch.write_text(f"#!{sys.executable}\nimport os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                       f"os.environ['PYTHONPATH'] = {str(REPO)!r}\nfrom sdbatch.cli.main import main\nsys.exit(main())\n")
    wrapper = root / "night.sh"
    wrapper.write_text(script.replace("/opt/sdbatch", str(root)))
    for executable in (sdbatch, wrapper):
        executable.chmod(0o755)
    return line.replace("/opt/sdbatch", str(root)), root / "night.log"


def cron(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["env", "-i", "/bin/sh", "-c", command], capture_output=True, text=True, timeout=300)


def test_the_cron_line_runs_from_a_venv_under_an_empty_environment_logs_and_never_overlaps(tmp_path):
    command, log = recipe_in(tmp_path)
    assert "bin/sdbatch" not in subprocess.run(["env", "-i", "/bin/sh", "-c", "command -v sdbatch"],
                                              capture_output=True, text=True).stdout  # as under cron: not on PATH
    done = cron(command)
    text = log.read_text()
    assert done.returncode == 0 and done.stdout == done.stderr == "", (done, text)  # all of it in the log
    assert "sdbatch night starts" in text and "3 images generated this run" in text
    assert re.search(r"\ndone\n=== \S+ sdbatch night ends: exit 0\n$", text), text
    assert sorted(r["id"] for r in load_index(tmp_path / "out")) == ["n0", "n1", "n2"]

    with open(tmp_path / "night.lock", "w") as held:  # last night's run still going
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        overlapping = cron(command)
    assert overlapping.returncode == 1 and log.read_text() == text  # refused at once; nothing ran, nothing logged
