"""Benchmark: validate and plan a 10,000,000-row manifest (issue 3).

Builds a realistic manifest in a temporary folder — id, prompt (a few hundred templates
filled with words), seed, steps, a label column — then times, each in a fresh process:

* ``sdbatch validate MANIFEST`` (the real CLI, as a subprocess), with its peak RSS
  (``ru_maxrss`` of that one child, from ``os.wait4``);
* the planning step as the driver does it: ``open_manifest`` (footers + fingerprint) and the
  shard list (``sdbatch.run.plan``), then ``read_rows`` of the LAST shard (must seek, not scan),
  with that process's own peak RSS.

Peak RSS on Linux includes the parent's high-water mark at fork/exec time, so the manifest
is built in a separate process and this driver never imports pyarrow itself.

Targets: validation within 60 s on a 2-core machine; peak memory under 1 GiB.

    python benchmarks/bench_manifest.py [--rows 10000000] [--keep DIR] [--bad]

``--bad`` measures the error path instead: 1% duplicate ids (the duplicate finder's second
pass and its larger arrays) and 0.1% steps=0 rows; it expects exit code 2 and the exact count.
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

SUBJECTS = ["cat", "dog", "fox", "owl", "car", "boat", "house", "tree", "robot", "castle", "lighthouse", "teapot"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "golden", "silver"]
STYLES = ["a photo of", "a painting of", "a sketch of", "a 3d render of", "an illustration of", "a watercolor of"]
PLACES = ["on a beach", "in a forest", "at night", "in the snow", "on a table", "under the sea", "in space", "in a city"]


def templates() -> list[str]:
    out = []
    for s in STYLES:
        for p in PLACES:
            for extra in ("", ", highly detailed", ", soft light, 35mm", ", trending on artstation"):
                out.append(f"{s} a {{color}} {{subject}} {p}{extra}")
    return out  # 192 templates


def build(path: str, rows: int, row_group_size: int = 65_536, bad: bool = False) -> float:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    pool = []
    for t in templates():
        for c in COLORS:
            for s in SUBJECTS:
                pool.append(t.format(color=c, subject=s))
    pool_arr = pa.array(pool)  # 23,040 distinct prompts
    labels = pa.array(SUBJECTS)
    t0 = time.perf_counter()
    writer = None
    chunk = 1_000_000
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        idx = np.arange(lo, lo + n, dtype=np.int64)
        id_num = idx.copy()
        if bad:  # 1% of ids repeat the previous row's; 0.1% of rows have steps 0
            id_num[idx % 100 == 99] -= 1
        ids = pc.binary_join_element_wise("img-", pc.utf8_lpad(pc.cast(pa.array(id_num), pa.string()), 9, "0"), "")
        pick = rng.integers(0, len(pool), n)
        steps = rng.choice(np.array([20, 30, 50]), n)
        if bad:
            steps[idx % 1000 == 7] = 0
        table = pa.table(
            {
                "id": ids,
                "prompt": pool_arr.take(pa.array(pick)),
                "seed": pa.array(rng.integers(0, 2**63 - 1, n, dtype=np.int64)),
                "steps": pa.array(steps),
                "label": labels.take(pa.array(pick % len(SUBJECTS))),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=row_group_size)
    writer.close()
    return time.perf_counter() - t0


PLAN_SCRIPT = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from sdbatch.manifest.reader import read_rows_at
from sdbatch.manifest.sources import open_manifest
from sdbatch.spec import JobSpec
import sdbatch.run.plan as plan
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
m = open_manifest(sys.argv[1])
t_open = time.perf_counter() - t1
rps = int(sys.argv[2])
t2 = time.perf_counter()
shards = list(plan.make_plan(m.num_rows, rps, 8).pending())
how = "plan.make_plan(...).pending"
t_plan = time.perf_counter() - t2
last = shards[-1]
t3 = time.perf_counter()
rows = read_rows_at(m, JobSpec(), last.rows)
t_read = time.perf_counter() - t3
assert len(rows) == last.num_rows and rows[-1].index == m.num_rows - 1
print(json.dumps({"import_s": t_import, "open_s": t_open, "plan_s": t_plan, "shards": len(shards), "how": how,
                  "read_last_shard_s": t_read, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def validate_cmd(path: str) -> list[str]:
    return [sys.executable, "-m", "sdbatch", "validate", path]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--keep", help="build (or reuse) the manifest in this folder")
    ap.add_argument("--bad", action="store_true", help="1%% duplicate ids and 0.1%% steps=0: the error path (exit 2)")
    ap.add_argument("--build-only", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        print(build(args.build_only, args.rows, bad=args.bad))
        return
    folder = args.keep or tempfile.mkdtemp(prefix="sdbatch-bench-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"manifest-{args.rows}{'-bad' if args.bad else ''}.parquet")
    if not os.path.exists(path):
        cmd = [sys.executable, __file__, "--build-only", path, "--rows", str(args.rows)] + (["--bad"] if args.bad else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        print(f"built {args.rows:,} rows in {float(out):.1f} s: {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
    else:
        print(f"reusing {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")

    cmd = validate_cmd(path)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        validate_s = time.perf_counter() - t0
        validate_rss = usage.ru_maxrss / 1024
        validate_cpu = usage.ru_utime + usage.ru_stime
        log.seek(0)
        text = log.read()
        print(text[:1500] + ("\n…\n" + text[-300:] if len(text) > 1800 else text[1500:]))
    expected = 2 if args.bad else 0
    assert proc.returncode == expected, f"validate exited with {proc.returncode}, expected {expected}"
    if args.bad:
        assert f"{args.rows // 100 + args.rows // 1000:,} errors in total" in text, "wrong error count"

    if args.bad:
        print(f"validate (bad manifest, exit 2) {args.rows:,} rows: {validate_s:.1f} s wall, {validate_cpu:.1f} s CPU, "
              f"peak RSS {validate_rss:.0f} MiB")
        return
    plan = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, path, str(args.rows_per_shard)], capture_output=True, text=True)
    if plan.returncode != 0:
        print(plan.stderr)
        raise SystemExit(1)
    p = json.loads(plan.stdout.strip().splitlines()[-1])

    print("command:", " ".join(os.path.basename(c) if c == sys.executable else c for c in cmd))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible, python {platform.python_version()}")
    print(f"validate {args.rows:,} rows: {validate_s:.1f} s wall ({args.rows / validate_s / 1e6:.2f} M rows/s), "
          f"{validate_cpu:.1f} s CPU, "
          f"peak RSS {validate_rss:.0f} MiB  [targets: <= 60 s, < 1024 MiB]")
    print(f"plan: import {p['import_s']:.2f} s, open_manifest (footer + sha256 fingerprint) {p['open_s']:.2f} s, "
          f"{p['shards']:,} shards of {args.rows_per_shard} via {p['how']} {p['plan_s']:.2f} s, "
          f"read_rows(last shard) {p['read_last_shard_s'] * 1000:.0f} ms, peak RSS {p['peak_rss_mib']:.0f} MiB")
    ok = validate_s <= 60 and validate_rss < 1024
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
