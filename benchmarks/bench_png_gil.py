"""Does Pillow's PNG encoder release the GIL on this build? Two measurements on the same 512²
images (as builtin:null draws them): (1) images/s with 1 thread, 2 threads and 2 processes;
(2) how fast a pure-Python loop runs while another thread encodes, relative to alone — near
1.0 means the encoder releases the GIL, near 0.5 or below means it holds it (on a loaded
machine (1) is noisy, (2) still tells).

    python benchmarks/bench_png_gil.py [--images 48] [--size 512] [--level 1]
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from PIL import Image

from sdbatch.models.null_model import draw


def encode(args: tuple) -> int:
    pixels, level = args
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=level)
    return len(buf.getvalue())


def rate(pool_cls, workers: int, jobs: list) -> float:
    with pool_cls(workers) as pool:
        list(pool.map(encode, jobs[:workers]))  # start-up excluded
        t0 = time.perf_counter()
        list(pool.map(encode, jobs))
        return len(jobs) / (time.perf_counter() - t0)


def python_loop_rate(seconds: float) -> float:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count / seconds


def gil_share(jobs: list) -> float:
    """The pure-Python loop's speed while a thread encodes, relative to its speed alone."""
    alone = python_loop_rate(1.0)
    done = threading.Event()

    def encode_all() -> None:
        while not done.is_set():
            for job in jobs:
                encode(job)

    worker = threading.Thread(target=encode_all)
    worker.start()
    try:
        during = python_loop_rate(2.0)
    finally:
        done.set()
        worker.join()
    return during / alone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--level", type=int, default=1)
    a = p.parse_args()
    jobs = [(draw(seed, a.size, a.size), a.level) for seed in range(a.images)]  # drawn before timing
    t0 = time.perf_counter()
    for job in jobs:
        encode(job)
    single = a.images / (time.perf_counter() - t0)
    threads = rate(ThreadPoolExecutor, 2, jobs)
    procs = rate(ProcessPoolExecutor, 2, jobs)
    share = gil_share(jobs[:4])
    print(f"a Python thread runs at {share:.2f}× its own speed while another thread encodes PNGs "
          f"({'the encoder releases the GIL' if share > 0.75 else 'the encoder holds the GIL'})")
    print(f"{a.size}² level {a.level}: 1 thread {single:.1f} img/s; 2 threads {threads:.1f} img/s "
          f"({threads / single:.2f}×); 2 processes {procs:.1f} img/s ({procs / single:.2f}×)")


if __name__ == "__main__":
    main()
