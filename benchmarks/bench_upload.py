"""Uploads to S3: the worker's upload pool versus one-at-a-time PUTs (issue 6).

Puts the same N images (~300 KB of incompressible, PNG-like random bytes) to a local
S3-compatible server (moto) with ``S3Storage.put_new`` (If-None-Match: *):
  1. sequentially, one after another;
  2. from a ``ThreadPoolExecutor`` of ``--threads`` workers (the worker's upload pool).
Each mode writes under its own prefix so every PUT creates a new object.

    python benchmarks/bench_upload.py                    # N=200, 8 threads, moto in-process
    python benchmarks/bench_upload.py --server process   # moto in a separate process (no shared GIL)
    python benchmarks/bench_upload.py --endpoint http://127.0.0.1:9000 --bucket b   # any S3 store
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import S3_FAKE_ENV, free_port, use_fake_s3_env, wait_for_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdbatch.storage.s3 import S3Storage
from sdbatch.storage.s3_client import register_client_hook


def start_server(kind: str):
    """Returns (endpoint, stop_fn)."""
    if kind == "thread":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return f"http://{host}:{port}", server.stop
    port = free_port()
    code = (
        "import logging; logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.server import ThreadedMotoServer\n"
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start()\n"
        "import time\nwhile True: time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, 30)

    def stop():
        proc.terminate()
        proc.wait(10)

    return f"http://127.0.0.1:{port}", stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="images per mode (default 200)")
    ap.add_argument("--size-kb", type=int, default=300, help="bytes per image in KB (default 300)")
    ap.add_argument("--threads", type=int, default=8, help="upload pool size (default 8)")
    ap.add_argument("--server", choices=["thread", "process"], default="thread",
                    help="moto in this process (ThreadedMotoServer) or in a child process")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per mode; medians reported (default 3)")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="add this delay before each request (a botocore hook) to mimic a remote store's RTT")
    ap.add_argument("--endpoint", help="use an existing S3-compatible endpoint instead of starting moto")
    ap.add_argument("--bucket", help="existing bucket (with --endpoint)")
    args = ap.parse_args()

    if args.endpoint:  # a real store: the user's credentials, if any, win
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            os.environ.setdefault(k, S3_FAKE_ENV[k])
    else:
        use_fake_s3_env()

    stop = None
    if args.endpoint:
        endpoint, bucket = args.endpoint, args.bucket
        if not bucket:
            raise SystemExit("--bucket is required with --endpoint")
    else:
        endpoint, stop = start_server(args.server)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        import boto3

        if not args.endpoint:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        run = uuid.uuid4().hex[:8]
        storage = S3Storage(f"s3://{bucket}/bench-{run}", endpoint_url=endpoint,
                            max_pool_connections=max(10, args.threads))
        rng = random.Random(0)
        images = [rng.randbytes(args.size_kb * 1024) for _ in range(args.n)]
        total_mb = sum(map(len, images)) / 1e6
        # warm-up: connections, client creation
        for i in range(3):
            storage.put_new(f"warmup/{i}.png", images[i])

        if args.latency_ms > 0:
            delay = args.latency_ms / 1000.0
            register_client_hook(lambda c: c.meta.events.register(
                "before-send.s3", lambda **kw: time.sleep(delay)))

        seq_times, pool_times = [], []
        for r in range(args.repeat):
            t0 = time.perf_counter()
            for i, data in enumerate(images):
                assert storage.put_new(f"seq{r}/{i:05d}.png", data).created
            seq_times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                results = list(pool.map(lambda kv, prefix=f"pool{r}/": storage.put_new(f"{prefix}{kv[0]:05d}.png", kv[1]),
                                        enumerate(images)))
            pool_times.append(time.perf_counter() - t0)
            assert all(x.created for x in results)
            assert len(storage.list(f"pool{r}/")) == args.n and len(storage.list(f"seq{r}/")) == args.n
            print(f"  round {r + 1}: sequential {args.n / seq_times[-1]:6.1f} images/s, "
                  f"pool {args.n / pool_times[-1]:6.1f} images/s")

        t_seq, t_pool = sorted(seq_times)[len(seq_times) // 2], sorted(pool_times)[len(pool_times) // 2]
        seq_rate, pool_rate = args.n / t_seq, args.n / t_pool
        where = endpoint if args.endpoint else f"moto ({args.server}) at {endpoint}"
        lat = f", +{args.latency_ms:g} ms per request" if args.latency_ms else ""
        print(f"uploads of {args.n} x {args.size_kb} KB ({total_mb:.1f} MB) with put_new to {where}{lat}; "
              f"median of {args.repeat}")
        print(f"  sequential      : {t_seq:6.2f} s  {seq_rate:7.1f} images/s  {total_mb / t_seq:6.1f} MB/s")
        print(f"  pool of {args.threads:<2} threads: {t_pool:6.2f} s  {pool_rate:7.1f} images/s  "
              f"{total_mb / t_pool:6.1f} MB/s")
        print(f"  ratio pool/sequential: {pool_rate / seq_rate:.2f}x")
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
