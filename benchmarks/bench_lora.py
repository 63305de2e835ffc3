"""LoRA switching cost and first-image latency per model family (issue 14).

1. On builtin:shapes with two PEFT LoRAs (the tests' builder): the same number of batches
   run once all on adapter ``a`` and once alternating ``a``/``b`` every batch; the difference
   per batch is what ``set_adapters`` switching costs (adapters are loaded once, never fused).
2. For the tiny random-weight pipeline of each family (SD 1.x, SD 2.x-v, SDXL, SD3; built from
   configs like the tests'), and SDXL with its tiny refiner (``refiner_switch`` 0.5): seconds
   from ``Generator.load`` to the first image (1 row, 2 steps, native size). Tiny models: this
   measures the machinery, not real-model speed.

    python benchmarks/bench_lora.py [--batches 8] [--batch-size 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import PROMPTS  # noqa: E402


def rows(batch: int, size: int, steps: int, loras: tuple):
    from sdbatch.data.row import Row

    return [Row(i, f"r{batch}-{i}", PROMPTS[i % len(PROMPTS)], "", 1000 * batch + i, steps, 5.0, 64, 64, "default",
                loras=loras) for i in range(size)]


def switching(root: Path, batches: int, size: int, steps: int) -> None:
    from model_families import build_shapes_lora

    from sdbatch.models.runtime import Generator

    paths = {n: str(build_shapes_lora(root / f"{n}.safetensors", seed=s)) for n, s in (("a", 1), ("b", 2))}
    gen = Generator.load("builtin:shapes", device="cpu", loras=paths)
    a, b = (("a", 1.0),), (("b", 1.0),)
    gen.generate(rows(0, size, steps, a))
    gen.generate(rows(0, size, steps, b))  # both loaded: what follows measures switching only
    for label, plan in (("all on a", [a] * batches), ("alternating a/b", [a, b] * (batches // 2))):
        times = []
        for number, loras in enumerate(plan):
            started = time.perf_counter()
            gen.generate(rows(number, size, steps, loras))
            times.append(time.perf_counter() - started)
        print(f"{label:16s} {len(plan)} batches of {size}: median {statistics.median(times) * 1000:.0f} ms/batch")
    switch = []
    for number in range(20):
        started = time.perf_counter()
        gen.loras.use(a if number % 2 else b)
        switch.append(time.perf_counter() - started)
    print(f"set_adapters switch alone: median {statistics.median(switch) * 1000:.1f} ms")


def first_image(root: Path) -> None:
    from model_families import build_all, build_sdxl_refiner

    from sdbatch.data.row import Row
    from sdbatch.models.families import local_traits
    from sdbatch.models.runtime import Generator

    folders = build_all(root / "families")
    refiner = build_sdxl_refiner(root / "families" / "sdxl-refiner", folders["sdxl"])
    runs = [(name, folder, None) for name, folder in folders.items()] + [("sdxl+refiner", folders["sdxl"], refiner)]
    for name, folder, refiner_folder in runs:
        traits = local_traits(folder)
        started = time.perf_counter()
        gen = Generator.load(str(folder), device="cpu", refiner=str(refiner_folder) if refiner_folder else None)
        loaded = time.perf_counter()
        gen.generate([Row(0, "x", "a red circle", "", 1, 2, 5.0, traits.native_width, traits.native_height, "default",
                          refiner_switch=0.5 if refiner_folder else None)])
        done = time.perf_counter()
        print(f"{name:12s} ({traits.family.name}, {traits.native_width}²): load {loaded - started:.2f} s, "
              f"first image {done - loaded:.2f} s, total {done - started:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as a worker with cpus_per_worker=1
    with tempfile.TemporaryDirectory(prefix="sdbatch-bench-lora-") as tmp:
        switching(Path(tmp), args.batches, args.batch_size, args.steps)
        first_image(Path(tmp))


if __name__ == "__main__":
    main()
