"""The machinery's own speed: ``builtin:null`` jobs (images cost nothing to make) at 512² and
1024², one Ray worker with 1 and then 2 CPUs, versus a plain single-thread PNG encode of the
same images on the same machine, in one run.

A job's steady-state rate comes from its commit times (the mtimes of ``metadata/NNNNN.parquet``):
rows committed after the first shard ÷ time from the first commit to the last — start-up
(Ray, the actor, the encode processes) excluded. The target (design.md §10): with 2 CPUs the job
sustains ≥ 1.0× the single-thread encode rate, and it scales with CPUs.

    python benchmarks/bench_machinery.py [--rows-512 384] [--rows-1024 128] [--rows-per-shard 64] [--batch-size 8]

The defaults are the job's own (64-row shards, batches of 8): a shard's last batch is stored and
committed while the model waits, so shards of one batch each (``--batch-size`` equal to
``--rows-per-shard``) measure that wait rather than the steady state.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from _common import commit_rate, seconds_each
from PIL import Image

from sdbatch.manifest.sources import open_manifest
from sdbatch.models.families.null import draw
from sdbatch.models.resolve import preflight
from sdbatch.output.claim import job_record
from sdbatch.run.cluster import connect_ray
from sdbatch.run.driver import run_job
from sdbatch.spec import load_spec
from sdbatch.storage.open import open_storage


def manifest(folder: Path, rows: int, size: int) -> Path:
    path = folder / f"null-{size}.parquet"
    pq.write_table(pa.table({"prompt": [f"row {i}" for i in range(rows)], "seed": list(range(rows)),
                             "width": [size] * rows, "height": [size] * rows}), path)
    return path


def encode_rate(rows: int, size: int) -> float:
    """Single-thread PNG encodes per second (level 1, as the jobs write) of the same pictures."""
    pictures = [draw(seed, size, size) for seed in range(rows)]
    seconds, _ = seconds_each(pictures, lambda pixels: Image.fromarray(pixels).save(io.BytesIO(), format="PNG", compress_level=1))
    return 1 / seconds


def job_rate(folder: Path, path: Path, size: int, cpus: int, rows_per_shard: int, batch_size: int) -> tuple[float, float]:
    """(steady-state images/s from commit times, wall seconds) of one job."""
    out = folder / f"out-{size}-{cpus}cpu"
    spec = load_spec(None, [], {"model.name": "builtin:null", "resources.cpus_per_worker": cpus,
                                "resources.rows_per_shard": rows_per_shard, "resources.batch_size": batch_size})
    source = open_manifest(str(path))
    storage = open_storage(str(out))
    job = job_record(spec, source, preflight("builtin:null").pin)
    t0 = time.perf_counter()
    outcome = run_job(spec, source, storage, job, interactive=False)
    wall = time.perf_counter() - t0
    assert outcome.exit_code == 0, outcome.message
    return commit_rate(out, source.num_rows, rows_per_shard), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows-512", type=int, default=384)
    p.add_argument("--rows-1024", type=int, default=128)
    p.add_argument("--rows-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    connect_ray(None)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"machine: {platform.node()}, {cluster_cpus} CPUs for Ray, python {platform.python_version()}")
    print("| size | rows | single-thread encode img/s | job 1 CPU img/s (×encode) | job 2 CPUs img/s (×encode) | 2 CPUs ÷ 1 CPU |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-machinery-") as tmp:
        folder = Path(tmp)
        for size, rows in ((512, args.rows_512), (1024, args.rows_1024)):
            path = manifest(folder, rows, size)
            encode = encode_rate(min(rows, 16), size)
            rates = {}
            for cpus in (1, 2):
                if cpus > cluster_cpus:
                    continue
                rates[cpus], wall = job_rate(folder, path, size, cpus, args.rows_per_shard, args.batch_size)
            one, two = rates.get(1, float("nan")), rates.get(2, float("nan"))
            print(f"| {size}² | {rows} | {encode:.2f} | {one:.2f} ({one / encode:.2f}×) | "
                  f"{two:.2f} ({two / encode:.2f}×) | {two / one:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
