"""Why the worker runs its model on one thread: CPU batches with one OpenMP team vs two.

torch's CPU kernels run on OpenMP (libgomp): every OS thread that calls torch gets a team of its
own, and libgomp stops spinning between parallel regions (it sleeps at once) when its teams hold
more threads than there are CPUs. The worker actor's two shard threads each calling the model
(before ``ShardRunner.model_thread``) made two teams. Each contender is a fresh process (a team
cannot be taken back) generating ``--batches`` batches of 8 on ``builtin:shapes`` (64², 20 DDIM
steps) on its main thread, after (``two teams``) another thread has also run one batch and is
still alive, as the actor's second shard thread was. Contenders alternate for ``--repeat``
rounds; prints the median seconds per batch, the CPU cores the process kept busy, and the ratio.

    python benchmarks/bench_model_thread.py [--batches 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("one team", "two teams")


def run(contender: str, batches: int) -> None:
    """In the child process: print seconds per batch and cores used."""
    import torch

    from sdbatch.data.row import Row
    from sdbatch.models.runtime import load_model

    torch.set_num_threads(2)
    model = load_model("builtin:shapes", device="cpu")
    batch = [Row(index=i, id=f"r{i}", prompt="a red circle", negative_prompt="", seed=i, steps=20, guidance_scale=7.5,
                 width=64, height=64, scheduler="ddim", extra={}) for i in range(8)]
    model.generate(batch)  # warm-up
    if contender == "two teams":
        done = threading.Event()
        threading.Thread(target=lambda: (model.generate(batch), done.set(), time.sleep(3600)), daemon=True).start()
        done.wait()
    seconds, cpu_started, started = [], time.process_time(), time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        model.generate(batch)
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
    for round_ in range(args.repeat):
        for contender in CONTENDERS if round_ % 2 == 0 else reversed(CONTENDERS):
            out = subprocess.run([sys.executable, __file__, "--child", contender, "--batches", str(args.batches)],
                                 capture_output=True, text=True, cwd=REPO, check=True).stdout
            per_batch, cores = map(float, out.split("RESULT")[1].split())
            results[contender].append((per_batch, cores))
            print(f"  round {round_ + 1} {contender}: {per_batch:.2f} s per batch, {cores:.2f} cores busy", flush=True)
    one, two = (statistics.median(s for s, _ in results[c]) for c in CONTENDERS)
    print(f"## median s per batch of 8: one team {one:.2f}, two teams {two:.2f} → two ÷ one = {two / one:.2f}×")


if __name__ == "__main__":
    main()
