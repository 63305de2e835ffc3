"""Benchmark: ``sdbatch export --where`` memory and time as the job grows (issue 23).

For each ``--rows`` size, builds a finished ``builtin:null`` OUT synthetically
(``tests/synthetic_output.py``: job.json, commits, a merged ``index.parquet``, no model run)
with images stored only for the rows the export selects (every ``--every``-th row: an export
reads no other image), then runs ``python -m sdbatch export OUT --to hf DEST --where
"row % EVERY = 0"`` in a fresh process for each contender:

* ``this tree`` — the code beside this script;
* ``baseline`` — the code at ``--baseline PATH`` (a checkout of an earlier commit), if given.

Prints each run's wall time and peak RSS (``ru_maxrss`` of that one child, from ``os.wait4``),
the growth from the smallest to the largest size per contender, and this tree / baseline per
size. The export runs in process (the selection is far under ``--parallel auto``'s threshold).

    python benchmarks/bench_export.py [--rows 50000 200000] [--every 200] [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def build(root: Path, rows: int, every: int) -> Path:
    sys.path.insert(0, str(HERE / "tests"))
    sys.path.insert(0, str(HERE))
    from synthetic_output import _png, build_output, row_id

    from sdbatch.output.commits import shard_name
    from sdbatch.output.layout import image_key

    out = build_output(root, rows, objects=False, rows_per_shard=1000)
    image = _png()
    for row in range(0, rows, every):
        path = out / image_key(shard_name(row // 1000), row_id(row), "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
    return out


def run(tree: Path, out: Path, dest: Path, every: int) -> tuple[float, float, str]:
    """Wall seconds, peak RSS MiB, last stdout line of one export in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "sdbatch", "export", str(out), "--to", "hf", str(dest),
                              "--where", f"row % {every} = 0"], env=env, cwd=tree,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = child.stdout.read(), child.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed ({tree}):\n{stderr}")
    return wall, usage.ru_maxrss / 1024, stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args()
    contenders = {"this tree": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    results: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for rows in args.rows:
            out = build(Path(tmp) / f"job{rows}", rows, args.every)
            for name, tree in contenders.items():
                wall, rss, said = run(tree, out, Path(tmp) / f"ds-{rows}-{name.replace(' ', '')}", args.every)
                results[name, rows] = wall, rss
                print(f"{name:10} {rows:>9,} rows  {wall:6.1f} s  {rss:7.0f} MiB peak RSS  ({said})")
    small, large = min(args.rows), max(args.rows)
    for name in contenders:
        (w0, r0), (w1, r1) = results[name, small], results[name, large]
        print(f"{name:10} {large:,} / {small:,} rows: wall ×{w1 / w0:.2f}, peak RSS ×{r1 / r0:.2f}")
    if args.baseline:
        for rows in args.rows:
            (w, r), (bw, br) = results["this tree", rows], results["baseline", rows]
            print(f"{rows:>9,} rows: this tree / baseline: wall ×{w / bw:.2f}, peak RSS ×{r / br:.2f}")


if __name__ == "__main__":
    main()
