"""Machinery overhead (design.md §10): sdbatch versus a bare diffusers loop and a naive loop.

Target: "an sdbatch job must reach >= 95% of the images/s of a bare diffusers loop over the
same model and batch size, and beat a naive loop that also encodes and writes each image in
sequence."

The same N manifest rows (64x64, ``--steps``, ddim, CFG 7.5, per-row seeds), cut into the same
shards of ``--rows-per-shard`` and canonical batches of ``--batch-size``, the same model and the
same torch thread count (``--threads``, default 1 = a worker with ``cpus_per_worker=1``) for:

  1. bare      ``Generator.load`` once, then ``generator.generate(batch)`` for every canonical
               batch; images discarded (the ceiling).
  2. naive     the same loop, and after each batch every image is encoded as PNG (exactly the
               bytes sdbatch writes: ``encode.encode_image`` with the same record, compress
               level 1) and written (local: a plain file; s3: ``S3Storage.put_new``), in
               sequence on the same thread.
  3. sdbatch   ``worker.ShardRunner(generator, storage, spec).run_shard(shard, rows)`` for every
     in-proc   shard: the real worker code path (upload thread pool, create-once writes, shard
               index commit), minus Ray.
  4. sdbatch   the real CLI, ``sdbatch submit manifest.parquet --out DIR --workers 1 ...``, as a
     job       subprocess that starts its own local Ray cluster. Reported: the wall time of the
               whole command, its one-off phases, and the generation-phase rate = rows / (first
               shard's start -> last shard's commit). The start is when the first stored image's
               batch began (the image's write time minus that batch's generate time, both from
               the index); the end is the last ``metadata/NNNNN.parquet`` write. Write times come
               from file mtimes (local) or from the S3 server's request log (s3).

Contenders 1-3 each load their own model once and generate one warm-up batch before timing.
Every round runs all contenders once, in an order rotated from round to round; the median
images/s of each is reported, with the ratios sdbatch/bare and sdbatch/naive (medians, and the
range of the per-round paired ratios).

    python benchmarks/bench_throughput.py                        # builtin:tiny (+ builtin:shapes if present), local
    python benchmarks/bench_throughput.py --storage s3           # contenders 2-4 write to a moto S3 server
    python benchmarks/bench_throughput.py --storage s3 --latency-ms 20   # ... that answers every request 20 ms late
    python benchmarks/bench_throughput.py --model builtin:tiny --rows 96 --steps 10 --rounds 3 --threads 1
    python benchmarks/bench_throughput.py --no-job               # in-process contenders only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _common import PROMPTS, free_port, use_fake_s3_env, wait_for_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))




# ---------------------------------------------------------------------------------------------
# S3: a moto ThreadedMotoServer whose WSGI app logs the arrival time of every PUT (and can add
# latency), in a child process (default) or in this process.


def _moto_server_class():
    from moto.server import DomainDispatcherApplication, ThreadedMotoServer, create_backend_app
    from werkzeug.serving import make_server

    class LoggingMotoServer(ThreadedMotoServer):
        """ThreadedMotoServer + a WSGI wrapper: ``(time.time(), method, path)`` of each PUT is
        appended to ``log_path`` when the request arrives; each request waits ``latency_s``."""

        def __init__(self, *args: Any, log_path: str | None = None, latency_s: float = 0.0, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.log_path = log_path
            self.latency_s = latency_s
            self._lock = threading.Lock()

        def _server_entry(self) -> None:
            inner = DomainDispatcherApplication(create_backend_app)
            log_file = open(self.log_path, "a", buffering=1) if self.log_path else None  # noqa: SIM115

            def app(environ, start_response):
                if self.latency_s:
                    time.sleep(self.latency_s)
                if log_file is not None and environ.get("REQUEST_METHOD") == "PUT":
                    line = f"{time.time():.6f} PUT {environ.get('PATH_INFO', '')}\n"
                    with self._lock:
                        log_file.write(line)
                return inner(environ, start_response)

            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    return LoggingMotoServer




def start_s3(kind: str, log_path: str, latency_ms: float):
    """Returns (endpoint, stop)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    if kind == "thread":
        server = _moto_server_class()(ip_address="127.0.0.1", port=0, verbose=False,
                                      log_path=log_path, latency_s=latency_ms / 1000)
        server.start()
        host, port = server.get_host_and_port()
        return f"http://{host}:{port}", server.stop
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--_moto-child", str(port), log_path, str(latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc, 60)

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return f"http://127.0.0.1:{port}", stop


def _moto_child(port: int, log_path: str, latency_ms: float) -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = _moto_server_class()(ip_address="127.0.0.1", port=port, verbose=False,
                                  log_path=log_path, latency_s=latency_ms / 1000)
    server.start()
    while True:
        time.sleep(3600)


def read_put_log(log_path: str, bucket: str, prefix: str) -> dict[str, float]:
    """key (relative to ``prefix``) -> time of its first PUT."""
    out: dict[str, float] = {}
    head = f"/{bucket}/{prefix}/"
    with open(log_path) as f:
        for line in f:
            t, _, path = line.rstrip("\n").split(" ", 2)
            if path.startswith(head):
                out.setdefault(path[len(head):], float(t))
    return out


# ---------------------------------------------------------------------------------------------
# contenders


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Bench:
    def __init__(self, args: argparse.Namespace, model: str, work: Path, endpoint: str | None, bucket: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from sdbatch.manifest.reader import read_rows_at
        from sdbatch.manifest.sources import open_manifest
        from sdbatch.run.plan import job_plan
        from sdbatch.spec import load_spec

        self.args, self.model, self.work, self.endpoint, self.bucket = args, model, work, endpoint, bucket
        self.manifest_path = work / "manifest.parquet"
        pq.write_table(pa.Table.from_pylist([
            {"id": f"r{i:05d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i} for i in range(args.rows)
        ]), self.manifest_path)
        # the spec the CLI builds from the flags passed to contender 4
        self.spec = load_spec(None, overrides={
            "model.name": model,
            "resources.workers": 1,
            "resources.batch_size": args.batch_size,
            "resources.rows_per_shard": args.rows_per_shard,
            "resources.cpus_per_worker": args.threads,
            "defaults.steps": args.steps,
            "defaults.guidance_scale": 7.5,
            "defaults.width": 64,
            "defaults.height": 64,
            "defaults.scheduler": "ddim",
        })
        manifest = open_manifest(str(self.manifest_path))
        self.shards = list(job_plan(manifest, self.spec).pending())
        self.shard_rows = [(s, read_rows_at(manifest, self.spec, s.rows)) for s in self.shards]
        self.generators: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}

    # -- helpers

    def storage_for(self, name: str):
        from sdbatch.storage.local import LocalStorage
        from sdbatch.storage.s3 import S3Storage

        if self.args.storage == "s3":
            return S3Storage(f"s3://{self.bucket}/{name}", endpoint_url=self.endpoint,
                             max_attempts=self.spec.retries.storage_attempts,
                             max_pool_connections=self.spec.resources.upload_threads)
        return LocalStorage(self.work / name)

    def generator(self, contender: str):
        if contender not in self.generators:
            from sdbatch.models.runtime import Generator
            from sdbatch.run.plan import canonical_batches

            t0 = time.perf_counter()
            gen = Generator.load(self.model, device=self.spec.model.device, dtype=self.spec.model.dtype)
            self.load_seconds[contender] = time.perf_counter() - t0
            gen.generate(canonical_batches(self.shard_rows[0][1], self.args.batch_size)[0])  # warm-up batch
            self.generators[contender] = gen
        return self.generators[contender]

    def warm_storage(self, tag: str) -> None:
        if self.args.storage == "s3":  # client creation and connection set-up are one-off costs
            self.storage_for(f"warmup-{tag}").put_new(f"w-{uuid.uuid4().hex}", b"warm-up")

    # -- the contenders; each returns seconds for all rows

    def run_bare(self, round_no: int) -> dict[str, Any]:
        from sdbatch.run.plan import canonical_batches

        gen = self.generator("bare")
        t0 = time.perf_counter()
        for _shard, rows in self.shard_rows:
            for batch in canonical_batches(rows, self.args.batch_size):
                gen.generate(batch)
        return {"seconds": time.perf_counter() - t0}

    def run_naive(self, round_no: int) -> dict[str, Any]:
        from sdbatch.data.record import ImageRecord
        from sdbatch.output import encode
        from sdbatch.output.layout import image_key
        from sdbatch.run.plan import batch_id, canonical_batches

        gen = self.generator("naive")
        out = self.spec.output
        ext = encode.extension(out.image_format)
        s3 = self.args.storage == "s3"
        storage = self.storage_for(f"naive-r{round_no}") if s3 else None
        root = self.work / f"naive-r{round_no}"
        self.warm_storage("naive")
        t0 = time.perf_counter()
        for shard, rows in self.shard_rows:
            for number, batch in enumerate(canonical_batches(rows, self.args.batch_size)):
                images = gen.generate(batch).pixels
                bid, batch_rows = batch_id(shard.name, number), [r.id for r in batch]
                for row, image in zip(batch, images):
                    record = ImageRecord.from_row(row, shard, bid, batch_rows, gen).to_embedded()
                    data = encode.encode_image(image, record, fmt=out.image_format,
                                               png_compress_level=out.png_compress_level, quality=out.quality)
                    key = image_key(shard.name, row.id, ext)
                    if s3:
                        storage.put_new(key, data)
                    else:
                        path = root / key
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(data)
        return {"seconds": time.perf_counter() - t0}

    def run_sdbatch(self, round_no: int) -> dict[str, Any]:
        from sdbatch.run.shard_runner import ShardRunner

        gen = self.generator("sdbatch")
        storage = self.storage_for(f"sdbatch-r{round_no}")
        self.warm_storage("sdbatch")
        runner = ShardRunner(gen, storage, self.spec, endpoint_url=self.endpoint, job_fingerprint="bench")
        try:
            t0 = time.perf_counter()
            results = [runner.run_shard(shard, rows) for shard, rows in self.shard_rows]
            seconds = time.perf_counter() - t0
        finally:
            runner.pool.shutdown(wait=True)
        assert all(r.committed and r.rows_ok == len(rows) for r, (_, rows) in zip(results, self.shard_rows)), results
        return {"seconds": seconds, "generate_seconds": sum(r.generate_seconds for r in results)}

    def run_job(self, round_no: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        a = self.args
        name = f"job-r{round_no}"
        out = f"s3://{self.bucket}/{name}" if a.storage == "s3" else str(self.work / name)
        cmd = [
            "sdbatch", "submit", str(self.manifest_path), "--out", out, "--model", self.model,
            "--workers", "1", "--batch-size", str(a.batch_size), "--rows-per-shard", str(a.rows_per_shard),
            "--steps", str(a.steps), "--guidance-scale", "7.5", "--width", "64", "--height", "64",
            "--scheduler", "ddim", "--set", f"resources.cpus_per_worker={a.threads}",
        ]
        if a.storage == "s3":
            cmd += ["--s3-endpoint", self.endpoint]
        if a.ray_address:
            cmd += ["--address", a.ray_address]
        self.job_command = " ".join(cmd)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        lines: list[tuple[float, str]] = []
        t_launch = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append((time.time(), line.rstrip("\n")))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc = proc.wait(timeout=a.job_timeout)
        t_exit = time.time()
        reader.join(10)
        if rc != 0:
            sys.stderr.write("\n".join(text for _, text in lines[-40:]) + "\n")
            raise SystemExit(f"sdbatch submit exited {rc}: {self.job_command}")
        t_ray = next((t for t, text in lines if "shards to generate" in text), float("nan"))

        storage = self.storage_for(name)
        index = pq.read_table(__import__("io").BytesIO(storage.get("index.parquet"))).to_pylist()
        if a.storage == "s3":
            put_times = read_put_log(self.put_log, self.bucket, name)
            written = lambda key: put_times[key]  # noqa: E731
        else:
            written = lambda key: (self.work / name / key).stat().st_mtime  # noqa: E731
        # each batch began when its first image was written minus the batch's generate time
        batch_start: dict[str, float] = {}
        for r in index:
            start = written(r["key"]) - r["generate_seconds"] * len(r["batch_rows"])
            batch_start[r["batch_id"]] = min(batch_start.get(r["batch_id"], start), start)
        gen_start = min(batch_start.values())
        gen_end = max(written(f"metadata/{s.name}.parquet") for s in self.shards)
        t_job_json = written("_sdbatch/job.json")
        progress = json.loads(storage.get("_sdbatch/progress.json"))
        success = json.loads(storage.get("_SUCCESS"))
        assert len(index) == a.rows and all(r["status"] == "ok" for r in index)
        return {
            "seconds": gen_end - gen_start,  # the generation phase
            "wall": t_exit - t_launch,
            "cli_to_job_json": t_job_json - t_launch,  # imports, validation, preflight, job claim
            "ray_start": t_ray - t_job_json,  # ray.init of a local cluster
            "actor_and_model_load": gen_start - t_ray,  # tracker + actor process + torch import + model load
            "finish": t_exit - gen_end,  # merge index, _SUCCESS, lock release, Ray shutdown
            "progress_json_ips": progress.get("images_per_second"),
            "success_ips": success.get("images_per_second_this_run"),
            "cli_line": next((text for _, text in lines if "images generated this run" in text), ""),
        }


CONTENDERS = {"bare": "run_bare", "naive": "run_naive", "sdbatch": "run_sdbatch", "job": "run_job"}
LABELS = {
    "bare": "1. bare diffusers loop",
    "naive": "2. naive loop (+ encode + write, sequential)",
    "sdbatch": "3. sdbatch ShardRunner in-process",
    "job": "4. sdbatch job (CLI + local Ray), generation phase",
}


def bench_model(args: argparse.Namespace, model: str, endpoint: str | None, bucket: str | None,
                put_log: str | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sdbatch-bench-throughput-", dir=args.tmp))
    try:
        b = Bench(args, model, work, endpoint, bucket)
        b.put_log = put_log
        names = [n for n in CONTENDERS if n != "job" or args.job]
        for n in names:  # load every in-process model (and warm up) before the first round
            if n != "job":
                b.generator(n)
        times: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                res = getattr(b, CONTENDERS[n])(r)
                times[n].append(res)
                print(f"  [{model}] round {r + 1} {n:8s}: {args.rows / res['seconds']:6.3f} images/s"
                      f" ({res['seconds']:.1f} s)" + (f", wall {res['wall']:.1f} s" if "wall" in res else ""),
                      flush=True)
        ips = {n: [args.rows / x["seconds"] for x in times[n]] for n in names}
        return {"model": model, "times": times, "ips": ips, "load_seconds": b.load_seconds,
                "job_command": getattr(b, "job_command", None)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    ips, times = result["ips"], result["times"]
    med = {n: median(v) for n, v in ips.items()}
    print()
    print(f"### {result['model']}: {args.rows} rows, 64x64, {args.steps} ddim steps, CFG 7.5, batch {args.batch_size}, "
          f"shards of {args.rows_per_shard}, {args.threads} torch thread(s), storage {args.storage}"
          + (f" (+{args.latency_ms:g} ms/request)" if args.latency_ms else "") + f", median of {args.rounds} rounds")
    print()
    print("| contender | images/s (median) | per round | vs bare |")
    print("|---|---|---|---|")
    for n, v in ips.items():
        print(f"| {LABELS[n]} | {med[n]:.3f} | {' / '.join(f'{x:.3f}' for x in v)} | {med[n] / med['bare']:.3f} |")
    print()

    def paired(a: str, b: str) -> tuple[float, str]:
        """The median of the per-round ratios (each round's contenders ran minutes apart at most,
        so this cancels most of the drift of the shared machine's load), and how it is shown."""
        rs = [x / y for x, y in zip(ips[a], ips[b])]
        return median(rs), (f"{median(rs):.3f} (median of per-round ratios {' / '.join(f'{x:.3f}' for x in rs)}; "
                            f"ratio of medians {med[a] / med[b]:.3f})")

    for who in [n for n in ("sdbatch", "job") if n in ips]:
        r_bare, text_bare = paired(who, "bare")
        r_naive, text_naive = paired(who, "naive")
        print(f"- {who}/bare  = {text_bare}: target >= 0.95 -> {'PASS' if r_bare >= 0.95 else 'FAIL'}")
        print(f"- {who}/naive = {text_naive}: target > 1 -> {'PASS' if r_naive > 1 else 'FAIL'}")
    print(f"- naive/bare = {paired('naive', 'bare')[1]}")
    print("- model load in-process (one-off): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["load_seconds"].items()))
    if "job" in times:
        js = times["job"]
        m = lambda key: median([j[key] for j in js])  # noqa: E731
        print(f"- job wall time (whole command): {m('wall'):.1f} s median "
              f"({' / '.join(format(j['wall'], '.1f') for j in js)}) = {args.rows / m('wall'):.3f} images/s end to end")
        print(f"  one-off phases (medians): CLI start + validation + job claim {m('cli_to_job_json'):.1f} s, "
              f"Ray start {m('ray_start'):.1f} s, actor start + model load {m('actor_and_model_load'):.1f} s, "
              f"generation {m('seconds'):.1f} s, index merge + _SUCCESS + Ray shutdown {m('finish'):.1f} s")
        print(f"  progress.json images_per_second {m('progress_json_ips'):.3f}, _SUCCESS images_per_second_this_run "
              f"{m('success_ips'):.3f} (both count from before the actor starts, so they include the model load)")
        print(f"  command: {result['job_command']}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_moto-child":
        _moto_child(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append",
                    help="model to run (repeatable); default builtin:tiny, plus builtin:shapes if present")
    ap.add_argument("--rows", type=int, default=96, help="manifest rows (default 96)")
    ap.add_argument("--steps", type=int, default=10, help="ddim steps (default 10)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows-per-shard", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads = the job's cpus_per_worker (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians reported (default 3)")
    ap.add_argument("--storage", choices=["local", "s3"], default="local",
                    help="where contenders 2-4 write: a local directory or a moto S3 server")
    ap.add_argument("--server", choices=["process", "thread"], default="process",
                    help="s3: moto in a child process (default; no GIL shared with the contenders) or in this one")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="s3: the server answers every request this much later (a remote store's round trip)")
    ap.add_argument("--no-job", dest="job", action="store_false", help="skip contender 4 (the CLI job on Ray)")
    ap.add_argument("--ray-address", help="run the job on this Ray cluster instead of a local one it starts")
    ap.add_argument("--job-timeout", type=float, default=1800)
    ap.add_argument("--tmp", help="where the outputs go (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()

    from sdbatch.models.builtin import builtin_names

    models = args.model or ["builtin:tiny"] + (["builtin:shapes"] if "shapes" in builtin_names() else [])
    endpoint = bucket = put_log = None
    stop = None
    if args.storage == "s3":
        use_fake_s3_env()
        fd, put_log = tempfile.mkstemp(prefix="sdbatch-bench-puts-", suffix=".log", dir=args.tmp)
        os.close(fd)
        endpoint, stop = start_s3(args.server, put_log, args.latency_ms)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    print(f"bench_throughput: models {', '.join(models)}; {args.rows} rows, {args.steps} steps, batch {args.batch_size}, "
          f"{args.threads} thread(s), storage {args.storage}" + (f" at {endpoint} (moto, {args.server})" if endpoint else ""),
          flush=True)
    results = []
    try:
        for model in models:
            results.append(bench_model(args, model, endpoint, bucket, put_log))
    finally:
        if stop is not None:
            stop()
        if put_log and not args.keep:
            os.unlink(put_log)
    for result in results:
        report(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
