"""Benchmark: ``verify`` of a finished job, in this process vs shard by shard on 1 and 2 Ray
workers (issue 23: verify scales with the workers), in full (every object read and hashed) and
listing-only modes.

Builds a local job output of ``--rows`` rows synthetically (``tests/synthetic_output.py``: the
commits, ``index.parquet``, ``job.json``; every image one ``--image-size``² PNG of noise, so
reading and hashing cost what a real image's do), then runs each contender in a fresh process
(a local Ray cluster of ``--cpus`` CPUs started there first and its worker processes warmed, not
timed) and prints the fastest of ``--repeats`` wall times of ``verify`` alone, rows/s, the peak RSS of that driver process (``ru_maxrss`` from
``os.wait4``), and the ratio of 1 to 2 workers. Every run must report the job clean.

    python benchmarks/bench_verify.py [--rows 20000] [--rows-per-shard 250] [--image-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BUILD = r"""
import io, sys
import numpy as np
from pathlib import Path
from PIL import Image
sys.path.insert(0, "tests")
import synthetic_output
root, rows, per_shard, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
buffer = io.BytesIO()
Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
synthetic_output._png = lambda: buffer.getvalue()  # the same noise image at every row's key
print(synthetic_output.build_output(root, rows, rows_per_shard=per_shard))
"""

RUN = r"""
import json, sys, time
out, workers, cpus, mode, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if workers:
    import ray
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")

    @ray.remote(num_cpus=1)
    def warm():  # a worker process per CPU, sdbatch imported: their start is not verify's cost
        import sdbatch.audit.object_check
        time.sleep(1)
    ray.get([warm.remote() for _ in range(cpus)])
from sdbatch.audit.verify import verify
walls = []
for _ in range(repeats):
    started = time.perf_counter()
    report = verify(out, workers=workers, listing_only=mode == "listing")
    walls.append(time.perf_counter() - started)
    assert report.clean, report.render()
print(json.dumps({"wall": min(walls), "ok": report.ok, "rows": report.rows_in_index}))
"""


def run(code: str, *args: str) -> tuple[str, float]:
    """Run ``code`` in a fresh Python; its stdout's last line and its peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"contender failed ({status}): {output}")
    return output.strip().splitlines()[-1], usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--repeats", type=int, default=3, help="verify runs per contender: the fastest is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        started = time.perf_counter()
        out, _ = run(BUILD, f"{tmp}/job", str(args.rows), str(args.rows_per_shard), str(args.image_size))
        print(f"built {args.rows:,} rows ({args.image_size}² PNG noise) at {out} in {time.perf_counter() - started:.0f} s")
        print(f"{platform.node()}: {os.cpu_count()} CPUs, Ray cluster of {args.cpus} CPUs; load average "
              f"{os.getloadavg()[0]:.1f}")
        print(f"{'mode':<8} {'contender':<14} {'wall s':>8} {'rows/s':>9} {'driver RSS MiB':>15}")
        for mode in ("full", "listing"):
            walls = {}
            for workers in (0, 1, 2):
                line, rss = run(RUN, out, str(workers), str(args.cpus), mode, str(args.repeats))
                result = json.loads(line)
                walls[workers] = result["wall"]
                name = "in process" if not workers else f"{workers} Ray worker" + "s" * (workers > 1)
                print(f"{mode:<8} {name:<14} {result['wall']:>8.1f} {result['rows'] / result['wall']:>9,.0f} {rss:>15.0f}")
            print(f"{mode:<8} 1 → 2 workers: {walls[1] / walls[2]:.2f}× faster; in process → 2 workers: "
                  f"{walls[0] / walls[2]:.2f}×")


if __name__ == "__main__":
    main()
