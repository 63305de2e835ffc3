"""The fixed cost of a job, and sdbatch beside Ray Data on the same rows.

1. Where a small job's time goes: ``sdbatch submit`` of N rows (default 3) on ``builtin:shapes``
   as a user runs it (a fresh local Ray cluster), its phases read from its log's timestamps —
   start-up and validation (imports, manifest, model preflight), Ray's start, worker start,
   model load and generation, the index merge, the report, and what follows the summary line
   (Ray's shutdown at exit) — beside the same rows generated in one process by
   ``models.runtime`` (the generation itself). Fixed cost = wall − generation. Each job's model
   seconds (its index's ``generate_seconds``) show whether the job's batches ran as fast as these.
2. The same 100 rows (``builtin:shapes`` 64², 20 DDIM steps, batch 8, one worker with 2 CPUs)
   through ``sdbatch submit --address`` and through Ray Data's ``map_batches`` (one actor holding
   the pipeline, PNGs written by the actor to a local folder), both drivers connecting to ONE
   local cluster this script starts with ``--cluster-cpus`` (3) logical CPUs: more than the
   2-CPU worker needs, so Ray Data can schedule its read tasks beside its actor (on a cluster of
   exactly 2 CPUs its actor takes them all and the read never runs). Neither pays Ray's start;
   each pays its own worker start, imports and model load. Prints each wall, the ratio, and
   checks both wrote every row's PNG (target: sdbatch ≤ 0.8 × Ray Data); then the same rows
   generated in this process, and what each contender took beyond that.

Contenders alternate (``--repeat`` rounds; medians reported), so a machine whose load drifts
affects them alike. ``--baseline DIR`` (another sdbatch checkout, e.g. ``main``'s worktree)
adds that checkout's 3-row job to part 1, so a change is measured beside what it changes.

    python benchmarks/bench_fixed_cost.py [--small-rows 3] [--rows 100] [--repeat 3]
        [--baseline /work/main] [--skip-small] [--skip-ray-data] [--cluster-cpus 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, shapes_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS, SIZE, BATCH = 20, 64, 8
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster each time, as a new user gets
#: Ray's single-machine mode: a driver joining the loopback cluster this script starts must look
#: for its node at 127.0.0.1, not the host's address (as in tests/conftest.py)
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: output line → the phase it ends (the first line matching each, in order; times are when the
#: line reached this process, so lines without a timestamp, such as the summary, count too)
PHASES = [
    ("start-up and validation", r"starting a local Ray cluster"),
    ("Ray start", r"shards? to generate"),
    ("workers, model load, generation", r"merging the index"),
    ("index merge, _SUCCESS", r"writing the report"),
    ("report", r"images generated this run"),
]


def driver_env(address: str | None) -> dict[str, str]:
    """A contender's environment: a fresh local cluster's (``ENV``), or, joining this process's
    cluster at ``address``, this process's environment now — ``ray.init`` set its auth mode
    there and ``shared_cluster`` the single-machine switch."""
    return ENV if address is None else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def manifest(folder: Path, rows: int) -> Path:
    path = folder / f"rows-{rows}.parquet"
    pq.write_table(pa.table({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(rows)], "seed": list(range(rows))}), path)
    return path


def sdbatch_submit(source: Path, out: Path, checkout: Path = REPO, workers: int = 1, cpus: int = 2,
                   address: str | None = None) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of ``sdbatch submit`` (of the sdbatch in ``checkout``; on the cluster at
    ``address``, else a fresh local one) and its output lines with the second each arrived."""
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "sdbatch", "submit", str(source), "--out", str(out), "--steps", str(STEPS),
         "--batch-size", str(BATCH), "--workers", str(workers), "--set", f"resources.cpus_per_worker={cpus}",
         "--set", "defaults.scheduler=ddim", "--set", f"defaults.width={SIZE}", "--set", f"defaults.height={SIZE}",
         "--set", f"resources.rows_per_shard={BATCH}", *(["--address", address] if address else [])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout,
        env={**driver_env(address), "PYTHONPATH": str(checkout)})
    assert process.stdout is not None
    lines = [(time.time() - started, line.rstrip()) for line in process.stdout]
    wall = time.time() - started
    if process.wait() != 0:
        raise SystemExit(f"sdbatch submit failed ({process.returncode}):\n" + "\n".join(line for _, line in lines[-40:]))
    return wall, lines


def model_seconds(out: Path) -> float:
    """The seconds the job's model spent generating its rows (the index's ``generate_seconds``)."""
    return sum(pq.read_table(out / "index.parquet", columns=["generate_seconds"]).column(0).to_pylist())


def phases(wall: float, lines: list[tuple[float, str]]) -> list[tuple[str, float]]:
    out, last = [], 0.0
    for name, pattern in PHASES:
        at = next((t for t, line in lines if re.search(pattern, line)), None)
        if at is not None:
            out.append((name, at - last))
            last = at
    out.append(("exit (Ray's shutdown)", wall - last))
    return out


def bare_generation(rows: int) -> float:
    """The rows' generation alone, in this process (model loaded first, not timed)."""
    import torch

    from sdbatch.models.runtime import load_model

    torch.set_num_threads(2)
    model = load_model("builtin:shapes", device="cpu")
    batch = shapes_rows(rows, STEPS, SIZE)
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        model.generate(batch[start:start + BATCH])
    return time.perf_counter() - started


RAY_DATA = r'''
import sys, time, io
started = time.time()
import ray, ray.data, torch
from pathlib import Path
source, out, steps, size, batch, address = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ray.init(address=address, log_to_driver=False)
out.mkdir(parents=True, exist_ok=True)

class Generate:
    def __init__(self):
        torch.set_num_threads(2)
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from sdbatch.models.builtin import resolve_builtin
        self.pipe = StableDiffusionPipeline.from_pretrained(resolve_builtin("builtin:shapes"), safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, rows):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in rows["seed"]]
        images = self.pipe(prompt=list(rows["prompt"]), num_inference_steps=steps, guidance_scale=7.5, width=size,
                           height=size, generator=generators).images
        for seed, image in zip(rows["seed"], images):
            image.save(out / f"{int(seed):08d}.png", compress_level=1)
        return {"seed": rows["seed"]}

ds = ray.data.read_parquet(source).map_batches(Generate, batch_size=batch, concurrency=1, num_cpus=2)
done = ds.count()
print(f"RAYDATA {done} {time.time() - started:.2f}")
'''


def ray_data(source: Path, out: Path, address: str) -> float:
    """Wall seconds of the Ray Data contender, a driver of its own on the cluster at ``address``."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", RAY_DATA, str(source), str(out), str(STEPS), str(SIZE), str(BATCH), address],
                            capture_output=True, text=True, cwd=REPO, env={**driver_env(address), "PYTHONPATH": str(REPO)})
    if result.returncode != 0 or "RAYDATA" not in result.stdout:
        raise SystemExit(f"Ray Data run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.time() - started


def pngs(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def shared_cluster(cpus: int) -> str:
    """Start the one local cluster both contenders of part 2 join (loopback, ``cpus`` logical
    CPUs) in this process; its GCS address."""
    os.environ[SINGLE_MACHINE] = "0"  # before ray is imported: Ray reads it then
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray.get_runtime_context().gcs_address


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def small_job(folder: Path, rows: int, repeat: int, baseline: Path | None) -> None:
    source = manifest(folder, rows)
    contenders = {"this checkout": REPO, **({f"baseline {baseline}": baseline} if baseline else {})}
    runs: dict[str, list[tuple[float, list[tuple[str, float]], float]]] = {name: [] for name in contenders}
    for round_ in range(repeat):
        for number, (name, checkout) in enumerate(contenders.items()):
            out = folder / f"small-{round_}-{number}"
            wall, lines = sdbatch_submit(source, out, checkout)
            runs[name].append((wall, phases(wall, lines), model_seconds(out)))
            print(f"  round {round_ + 1} {name}: {wall:.1f} s, its model {runs[name][-1][2]:.1f} s ({load_average()})", flush=True)
    generation = bare_generation(rows)
    for name, results in runs.items():
        wall = statistics.median(w for w, _, _ in results)
        print(f"## {name}: {rows}-row job on builtin:shapes ({SIZE}², {STEPS} steps): median {wall:.1f} s wall of "
              f"{len(results)}, {generation:.1f} s of generation → fixed cost {wall - generation:.1f} s; the job's "
              f"model took {statistics.median(m for _, _, m in results):.1f} s of it")
        for i, (phase, _) in enumerate(results[0][1]):
            print(f"  {phase:32s} {statistics.median(p[i][1] for _, p, _ in results):6.1f} s")


def beside_ray_data(folder: Path, rows: int, repeat: int, cluster_cpus: int) -> None:
    source = manifest(folder, rows)
    address = shared_cluster(cluster_cpus)
    print(f"  one local cluster of {cluster_cpus} logical CPUs at {address} for both contenders", flush=True)
    ours, theirs, model = [], [], []
    for round_ in range(repeat):
        # alternate which goes first, so a load that drifts within a round weighs on both alike
        order = ["sdbatch", "Ray Data"] if round_ % 2 == 0 else ["Ray Data", "sdbatch"]
        for contender in order:
            if contender == "sdbatch":
                ours.append(sdbatch_submit(source, folder / f"sdbatch-{round_}", address=address)[0])
                written = pngs(folder / f"sdbatch-{round_}" / "images")
                model.append(model_seconds(folder / f"sdbatch-{round_}"))
            else:
                theirs.append(ray_data(source, folder / f"raydata-{round_}", address))
                written = pngs(folder / f"raydata-{round_}")
            if written != rows:
                raise SystemExit(f"{contender} wrote {written} PNGs of {rows} rows")
        print(f"  round {round_ + 1} ({' first, '.join(order)} second): sdbatch {ours[-1]:.1f} s, Ray Data "
              f"{theirs[-1]:.1f} s → {ours[-1] / theirs[-1]:.2f}× ({load_average()})", flush=True)
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    generation = bare_generation(rows)
    print(f"## {rows} rows, batch {BATCH}, one worker with 2 CPUs, one {cluster_cpus}-CPU cluster (medians of {repeat}): "
          f"sdbatch {ours_s:.1f} s, Ray Data map_batches {theirs_s:.1f} s → sdbatch ÷ Ray Data = {ours_s / theirs_s:.2f}×")
    # what each pays beyond the images themselves: the ratio's floor is (generation + sdbatch's) ÷ (generation + Ray Data's)
    print(f"  the same rows generated in one process: {generation:.1f} s ({load_average()}) → beyond it: sdbatch "
          f"{ours_s - generation:.1f} s (its model {statistics.median(model):.1f} s), Ray Data {theirs_s - generation:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small-rows", type=int, default=3)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="rounds of each contender, alternating")
    p.add_argument("--baseline", type=Path, help="another sdbatch checkout whose 3-row job runs beside this one's")
    p.add_argument("--skip-small", action="store_true")
    p.add_argument("--skip-ray-data", action="store_true")
    p.add_argument("--cluster-cpus", type=int, default=3, help="logical CPUs of part 2's shared cluster (> the worker's 2)")
    args = p.parse_args()
    print(f"{load_average()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fixed-") as tmp:
        if not args.skip_small:
            small_job(Path(tmp), args.small_rows, args.repeat, args.baseline)
        if not args.skip_ray_data:
            beside_ray_data(Path(tmp), args.rows, args.repeat, args.cluster_cpus)


if __name__ == "__main__":
    main()
