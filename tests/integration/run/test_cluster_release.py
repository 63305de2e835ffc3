"""When the driver lets go of Ray: a cluster it started for the job alone is shut down as soon as the
job needs Ray no more (``run.cluster.shut_down_job_local_cluster``, on a thread of its own, while the
report is written); a cluster the job joined is left running."""

from __future__ import annotations

import os
import subprocess
import sys

RELEASE = """
import sys, threading, ray
from sdbatch.run import cluster
cluster.connect_ray(sys.argv[1] or None)
cluster.shut_down_job_local_cluster()
for thread in threading.enumerate():
    if thread.name == "ray-shutdown":
        thread.join(60)
print("connected" if ray.is_initialized() else "shut down")
"""


def release(address: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", RELEASE, address], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_job_local_cluster_is_shut_down_and_a_joined_one_left(ray_address):
    import ray

    assert release("") == "shut down"
    assert release(ray_address) == "connected"
    assert ray.get(ray.remote(lambda: 42).remote()) == 42  # the joined cluster still runs
