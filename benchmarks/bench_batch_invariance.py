"""Batch invariance (issue 8): how much does a row's image depend on the batch it runs in?

For each model and sampler: 8 rows (different prompts and seeds, one CPU generator per row, as
sdbatch generates them) are run (a) together as one batch of 8, (b) each alone, (c) as the
same batch of 8 a second time, (d) with the batch in reverse order, and (e) as one batch
with another torch thread count. Reported per comparison: the largest absolute difference of
the decoded float output (in [0, 1]) and of the uint8 pixels sdbatch stores
(``round(x * 255)``, as diffusers' ``numpy_to_pil``), and how many of the 8 images differ at all.

    python benchmarks/bench_batch_invariance.py                      # builtin:tiny (+ shapes if present)
    python benchmarks/bench_batch_invariance.py --model builtin:tiny --steps 10 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import PROMPTS

from sdbatch.data.row import Row
from sdbatch.models.builtin import builtin_names
from sdbatch.models.runtime import Generator


def rows_for(scheduler: str, steps: int, size: int, guidance: float) -> list[Row]:
    return [
        Row(index=i, id=f"b{i}", prompt=p, negative_prompt="", seed=1234 + 97 * i, steps=steps,
            guidance_scale=guidance, width=size, height=size, scheduler=scheduler)
        for i, p in enumerate(PROMPTS)
    ]


@torch.inference_mode()
def run(gen: Generator, rows: list[Row]) -> np.ndarray:
    """What ``Generator.generate`` does, with the float output kept (output_type="np")."""
    first = rows[0]
    pipe = gen.txt2img
    pipe.scheduler = gen.make_scheduler(first.scheduler)
    out = pipe(
        prompt=[r.prompt for r in rows], negative_prompt=[r.negative_prompt for r in rows],
        num_inference_steps=first.steps, guidance_scale=first.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows],
        height=first.height, width=first.width, output_type="np",
    )
    return np.asarray(out.images, dtype=np.float64)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return (x * 255).round().astype(np.int16)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    ua, ub = to_uint8(a), to_uint8(b)
    return {
        "max_abs_float": float(np.abs(a - b).max()),
        "max_uint8": int(np.abs(ua - ub).max()),
        "images_differing_uint8": int(sum((ua[i] != ub[i]).any() for i in range(len(a)))),
    }


def bench(model: str, scheduler: str, steps: int, size: int, guidance: float, device: str, dtype: str,
          threads: int, other_threads: int) -> dict:
    torch.set_num_threads(threads)
    gen = Generator.load(model, device=device, dtype=dtype)
    rows = rows_for(scheduler, steps, size, guidance)
    t0 = time.perf_counter()
    batch = run(gen, rows)
    batch_s = time.perf_counter() - t0
    alone = np.concatenate([run(gen, [r]) for r in rows])
    again = run(gen, rows)
    reverse = run(gen, rows[::-1])[::-1]
    torch.set_num_threads(other_threads)
    other = run(gen, rows)
    torch.set_num_threads(threads)
    return {
        "model": model, "scheduler": scheduler, "steps": steps, "size": size, "device": gen.info.device,
        "dtype": gen.info.dtype, "threads": threads, "torch": torch.__version__, "batch8_seconds": round(batch_s, 2),
        "alone_vs_batch8": compare(alone, batch),
        "batch8_twice": compare(again, batch),
        "batch8_reversed": compare(reverse, batch),
        f"threads_{other_threads}_vs_{threads}": compare(other, batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="default: builtin:tiny and builtin:shapes if present")
    parser.add_argument("--scheduler", action="append", help="default: ddim and euler_a")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses cpus_per_worker)")
    parser.add_argument("--other-threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    models = args.model or ["builtin:tiny"] + (["builtin:shapes"] if "shapes" in builtin_names() else [])
    results = []
    for model in models:
        for scheduler in args.scheduler or ["ddim", "euler_a"]:
            r = bench(model, scheduler, args.steps, args.size, args.guidance, args.device, args.dtype,
                      args.threads, args.other_threads)
            results.append(r)
            if args.json:
                print(json.dumps(r))
                continue
            print(f"{model} {scheduler} {r['steps']} steps {r['size']}px on {r['device']} ({r['dtype']}, "
                  f"{r['threads']} threads, torch {r['torch']}), batch of 8: {r['batch8_seconds']} s")
            for key, c in r.items():
                if isinstance(c, dict):
                    print(f"  {key:<22} max |float diff| {c['max_abs_float']:.3g}   max uint8 diff {c['max_uint8']}   "
                          f"images differing {c['images_differing_uint8']}/8")


if __name__ == "__main__":
    main()
