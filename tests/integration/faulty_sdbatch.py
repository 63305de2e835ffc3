"""``python tests/integration/faulty_sdbatch.py ARGS``: the sdbatch CLI with the test faults its environment
names (faults.TEST_ENV) installed — in this process, and in every Ray worker process of the
job through Ray's documented ``runtime_env`` ``worker_process_setup_hook``
(faults.worker_runtime_env). Tests start it through ``faults.sdbatch_command``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import ray

# run as a script: make tests/ importable, as pytest does, so the helpers are ``integration.*``
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration import faults  # noqa: E402

faults.setup_process()
ray.init = functools.partial(ray.init, runtime_env=faults.worker_runtime_env())

from sdbatch.cli.main import main  # noqa: E402  (after the faults are installed)

main()
