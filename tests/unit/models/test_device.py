"""The software versions an image records travel to processes that never import torch (the
driver, through the worker's ``ready()``; each image encoder, inside the record): unpickling
them there must not import it."""

from __future__ import annotations

import pickle
import subprocess
import sys

from sdbatch.models.device import software_versions


def test_software_versions_unpickle_without_importing_torch():
    versions = software_versions()
    assert all(type(value) is str for value in versions.values()), versions
    check = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    unpickled = subprocess.run([sys.executable, "-c", check], input=pickle.dumps(versions), capture_output=True, check=True)
    assert unpickled.stdout.decode().strip() == "[]"
