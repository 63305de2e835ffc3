"""Benchmark: what integration test files cost, this tree against a baseline checkout, by CPU.

On a machine shared with other work, a test's wall time says more about the neighbours than about
the test; the CPU its processes burn does not. Each named pytest target runs in a fresh
``python -m pytest TARGET -n 0`` of each contender, back to back, and the CPU time (user + system)
of that process and every descendant — its session Ray cluster, the CLI subprocesses, their Ray
workers — is sampled every 0.2 s (a process's last 0.2 s before it exits is not seen). Prints per
target: the contenders' CPU seconds, wall seconds and the CPU ratio this tree / baseline.

* ``this tree`` — the code beside this script;
* ``baseline`` — the code at ``--baseline PATH`` (e.g. ``git archive main | tar -x -C PATH``).

    python benchmarks/bench_tests.py --baseline /tmp/main tests/integration/models/test_embeddings.py [...]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parents[1]


def cpu_of_tree(command: list[str], cwd: Path) -> tuple[float, float, int]:
    """(CPU seconds of the process and its descendants, wall seconds, exit status) of ``command``."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(cwd)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    last_seen: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds when last sampled
    while proc.poll() is None:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in family:
            try:
                times = process.cpu_times()
                last_seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:  # it exited between the listing and the reading
                pass
        time.sleep(0.2)
    proc.wait()
    return sum(last_seen.values()), time.perf_counter() - started, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="+", help="pytest targets: files or FILE::TEST")
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    args = p.parse_args()
    contenders = {"this tree": HERE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}")
    print("| target | " + " | ".join(f"{name} CPU s (wall s)" for name in contenders) + " | CPU this tree ÷ baseline |")
    print("|---|" + "---|" * len(contenders) + "---|")
    for target in args.targets:
        figures = {}
        for name, tree in contenders.items():
            command = [sys.executable, "-m", "pytest", target, "-n", "0", "-q", "-p", "no:cacheprovider"]
            cpu, wall, status = cpu_of_tree(command, tree)
            figures[name] = (cpu, wall, status)
        cells = " | ".join(f"{cpu:.1f} ({wall:.0f}){'' if status == 0 else f' exit {status}'}"
                           for cpu, wall, status in figures.values())
        ratio = figures["this tree"][0] / figures["baseline"][0] if "baseline" in figures else float("nan")
        print(f"| `{target}` | {cells} | {ratio:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
