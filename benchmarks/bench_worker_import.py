"""Why the worker imports ``models.runtime`` with the cyclic collector off: the import, then batches.

Each contender is a fresh process, as a worker actor is, that has imported what a worker has before it
loads a model (Ray, ``sdbatch.run.worker``), then:

- ``collector off``: ``models.loader.import_runtime`` (the worker now: the collector off during the
  import, what it made frozen, the collector back on);
- ``collector on``: ``import sdbatch.models.runtime`` as any import runs (the worker before).

Then each loads ``builtin:shapes`` and makes ``--batches`` batches of 8 (64², 20 DDIM steps, 2 torch
threads), so a cost moved from the import into generation would show. Contenders alternate for
``--repeat`` rounds; prints the medians of the import's seconds, the seconds per batch, the full
collections during the batches, peak RSS, and the ratios.

    python benchmarks/bench_worker_import.py [--batches 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate_in_fresh_processes, shapes_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("collector off", "collector on")


def run(contender: str, batches: int) -> None:
    """In the child process: print one JSON line of figures."""
    import gc

    import ray  # noqa: F401 - what a worker has imported before its model

    import sdbatch.run.worker  # noqa: F401

    started = time.perf_counter()
    if contender == "collector off":
        from sdbatch.models.loader import import_runtime

        runtime = import_runtime()
    else:
        from sdbatch.models import runtime
    imported = time.perf_counter() - started
    runtime.torch.set_num_threads(2)
    model = runtime.load_model("builtin:shapes", device="cpu")
    rows = shapes_rows(8)
    model.generate(rows)  # the first batch warms the allocator; not timed
    full_before = gc.get_stats()[2]["collections"]
    started = time.perf_counter()
    for _ in range(batches):
        model.generate(rows)
    per_batch = (time.perf_counter() - started) / batches
    print(json.dumps({"import_s": imported, "batch_s": per_batch,
                      "full_collections": gc.get_stats()[2]["collections"] - full_before,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run(args.child, args.batches)
        return
    figures: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
    child_env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for round_, contender, out in alternate_in_fresh_processes(__file__, CONTENDERS, args.repeat,
                                                               ["--batches", str(args.batches)], env=child_env):
        line = json.loads(out.strip().splitlines()[-1])
        figures[contender].append(line)
        print(f"  round {round_} {contender}: import {line['import_s']:.2f} s, "
              f"{line['batch_s']:.2f} s per batch", flush=True)
    medians = {c: {k: statistics.median(f[k] for f in figures[c]) for k in figures[c][0]} for c in CONTENDERS}
    for contender, m in medians.items():
        print(f"{contender:>14}: import {m['import_s']:.2f} s, {m['batch_s']:.2f} s per batch, "
              f"{m['full_collections']:.0f} full collections in {args.batches} batches, peak RSS {m['peak_rss_mib']:.0f} MiB")
    off, on = medians["collector off"], medians["collector on"]
    print(f"import: collector on ÷ off = {on['import_s'] / off['import_s']:.2f}× "
          f"({on['import_s'] - off['import_s']:+.2f} s); per batch {on['batch_s'] / off['batch_s']:.2f}×; "
          f"peak RSS off ÷ on = {off['peak_rss_mib'] / on['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
