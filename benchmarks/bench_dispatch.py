"""Benchmark: the driver's own cost — planning, dispatch and result handling (issue 13).

Runs the real ``scheduler.Driver`` (real local Ray cluster, real actor pool, tracker, progress,
``_SUCCESS``) against stub workers that generate nothing: each ``run_shard`` reports to the
tracker as a worker does and returns the shard's ``ShardResult`` at once. The manifest is a
one-column Parquet file of ``--rows`` rows (built and cached by another process, so the
measuring child inherits none of its memory). The child reports:

* driver CPU per shard: ``time.process_time()`` of the driver process across ``Driver.run``
  (Ray's own threads in the driver included; ``ray.init`` of the benchmark's own local
  cluster excluded), ÷ shards dispatched;
* driver peak RSS: the child's ``ru_maxrss`` (Ray's core worker included).

Targets (design.md §10): ≤ 2 ms driver CPU per shard; memory flat in manifest size (< 300 MiB with
10,000,000 rows planned). ``--seconds S`` stops the run S seconds after it starts (its
``--deadline``): with a large ``--rows`` that measures a driver holding the whole plan.

    python benchmarks/bench_dispatch.py                                  # 1,000,000 rows, 15,625 shards
    python benchmarks/bench_dispatch.py --rows 10000000 --seconds 20     # the 10M-row plan held
    PYTHONPATH=/tmp/sdbatch-old python benchmarks/bench_dispatch.py      # another checkout's driver
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path(tempfile.gettempdir()) / "sdbatch-bench-dispatch"


def build_manifest(rows: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = CACHE / f"manifest-{rows}.parquet"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        prompts = pa.DictionaryArray.from_arrays(pa.array(np.arange(rows, dtype=np.int32) % 8), pa.array(
            [f"a {c} circle, white background" for c in ("red", "green", "blue", "yellow", "purple", "orange", "black", "grey")]
        ))
        pq.write_table(pa.table({"prompt": prompts.cast(pa.string())}), path.with_suffix(".tmp"), row_group_size=65_536)
        path.with_suffix(".tmp").rename(path)
    return path


def child(args: argparse.Namespace) -> None:
    import logging

    import ray

    from sdbatch.manifest.sources import open_manifest
    from sdbatch.output.claim import job_record
    from sdbatch.run.driver import Driver, _Actor
    from sdbatch.run.protocol import ShardResult
    from sdbatch.spec import load_spec
    from sdbatch.storage.open import open_storage

    logging.basicConfig(level=logging.WARNING)

    @ray.remote(num_cpus=0)
    class StubWorker:
        """A worker that does no generation: the same calls as ``WorkerActor``."""

        def __init__(self, tracker):
            self.tracker = tracker

        def ready(self):
            return {"worker": "stub"}

        def prefetch(self, shard, retry_ids=None):
            return None

        def run_shard(self, shard, turn, attempt, retry_ids=None, not_after=None):
            self.tracker.report.remote("stub", shard.name, 0, 0)
            self.tracker.report.remote("stub", shard.name, shard.num_rows, 0)
            return ShardResult(shard=shard.name, rows_ok=shard.num_rows, worker="stub")

    class StubDriver(Driver):
        def _new_actor(self):
            handle = StubWorker.remote(self.tracker)
            return _Actor(handle, handle.ready.remote())

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    manifest = open_manifest(str(args.manifest))
    spec = load_spec(None, [], {"resources.workers": args.workers, "resources.cpus_per_worker": 0.01,
                                "resources.rows_per_shard": args.rows_per_shard})
    out_dir = tempfile.TemporaryDirectory(prefix="sdbatch-bench-out-")
    storage = open_storage(out_dir.name)
    # a cluster of its own (``address="local"``), never one another process left running here
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    rss_ray = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deadline = time.time() + args.seconds if args.seconds else None
    driver = StubDriver(spec, manifest, storage, job_record(spec, manifest, None), interactive=False, deadline=deadline)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    outcome = driver.run()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    shards = -(-outcome.rows_generated // args.rows_per_shard)
    print(json.dumps({
        "rows": manifest.num_rows, "rows_generated": outcome.rows_generated, "shards_run": shards,
        "exit_code": outcome.exit_code, "wall_s": round(wall, 1), "driver_cpu_s": round(cpu, 2),
        "driver_cpu_ms_per_shard": round(1000 * cpu / max(shards, 1), 3),
        "rss_before_ray_mib": round(rss_start / 1024), "rss_after_ray_init_mib": round(rss_ray / 1024),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))
    out_dir.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=0, help="stop the run this long after it starts (0: run it all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.build:
        print(build_manifest(args.rows))
        return
    # built in another process: Linux carries a parent's peak RSS into its exec'ed children
    manifest = subprocess.run([sys.executable, __file__, "--build", "--rows", str(args.rows)],
                              check=True, capture_output=True, text=True).stdout.strip()
    cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--rows-per-shard", str(args.rows_per_shard),
           "--workers", str(args.workers), "--seconds", str(args.seconds)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"the measuring child failed ({run.returncode}):\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(machine=f"{platform.machine()} {os.cpu_count()} CPUs", load_average=os.getloadavg()[0],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
