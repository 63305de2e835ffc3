"""Why the worker runs its model on one thread: CPU batches on one thread vs two taking turns.

torch's CPU kernels run on OpenMP (libgomp): every OS thread that calls torch gets a team of its
own, and libgomp stops spinning between parallel regions (it sleeps at once) when its teams hold
more threads than there are CPUs. Each contender is a fresh process (a team cannot be taken back)
making ``--batches`` batches of 8 on ``builtin:shapes`` (64², 20 DDIM steps), as a worker actor:

- ``one thread``: the model loaded and every batch run on one thread of its own (the worker now);
- ``two threads``: the model loaded on the main thread, and the batches run by two threads in
  turn (the worker before: its two ``run_shard`` threads took turns at the model).

Contenders alternate for ``--repeat`` rounds; prints the median seconds per batch, the CPU cores
the process kept busy, and the ratio.

    python benchmarks/bench_model_thread.py [--batches 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate_in_fresh_processes, shapes_rows  # noqa: E402

CONTENDERS = ("one thread", "two threads")


def run(contender: str, batches: int) -> None:
    """In the child process: print seconds per batch and cores used."""
    import torch

    from sdbatch.models.runtime import load_model

    def load():
        torch.set_num_threads(2)
        return load_model("builtin:shapes", device="cpu")

    batch = shapes_rows(8)
    if contender == "one thread":
        threads = [ThreadPoolExecutor(1)]
        model = threads[0].submit(load).result()
    else:
        model, threads = load(), [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    turns = itertools.cycle(threads)
    for thread in threads:  # warm-up, on each thread
        thread.submit(model.generate, batch).result()
    seconds, cpu_started, started = [], time.process_time(), time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        next(turns).submit(model.generate, batch).result()
        seconds.append(time.perf_counter() - t)
    cores = (time.process_time() - cpu_started) / (time.perf_counter() - started)
    print(f"RESULT {statistics.median(seconds):.3f} {cores:.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run(args.child, args.batches)
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in CONTENDERS}
    for round_, contender, out in alternate_in_fresh_processes(__file__, CONTENDERS, args.repeat,
                                                               ["--batches", str(args.batches)]):
        per_batch, cores = map(float, out.split("RESULT")[1].split())
        results[contender].append((per_batch, cores))
        print(f"  round {round_} {contender}: {per_batch:.2f} s per batch, {cores:.2f} cores busy", flush=True)
    one, two = (statistics.median(s for s, _ in results[c]) for c in CONTENDERS)
    print(f"## median s per batch of 8: one thread {one:.2f}, two threads {two:.2f} → two ÷ one = {two / one:.2f}×")


if __name__ == "__main__":
    main()
