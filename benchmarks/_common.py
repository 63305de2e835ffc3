"""Shared pieces of the benchmark scripts: prompts and rows, a local S3 server's plumbing, timing,
contenders alternating in fresh processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

PROMPTS = [
    "a large red circle in the center, blue background",
    "a small green square, white background",
    "a blue triangle on the left",
    "a yellow star, black background",
    "two red squares",
    "a large purple circle, green background",
    "an orange triangle at the top",
    "a small white circle, red background",
]



def shapes_rows(count: int, steps: int = 20, size: int = 64) -> list:
    """``count`` rows for ``builtin:shapes`` (DDIM, guidance 7.5, seeds 0…), the prompts above in turn."""
    from sdbatch.data.row import Row

    return [Row(index=i, id=f"r{i}", prompt=PROMPTS[i % len(PROMPTS)], negative_prompt="", seed=i, steps=steps,
                guidance_scale=7.5, width=size, height=size, scheduler="ddim", extra={}) for i in range(count)]


S3_FAKE_ENV = {  # as tests/conftest.py's s3_server fixture
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/sdbatch-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sdbatch-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def use_fake_s3_env() -> None:
    """Point this process (and its children) at fake credentials only, as the tests do, so a
    user's AWS profile or endpoint never reaches the benchmark's moto server."""
    os.environ.update(S3_FAKE_ENV)
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until a server process listens on 127.0.0.1:port; kill it and stop if it never does."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server process did not start")


def commit_rate(out_dir, rows_total: int, rows_first_shard: int) -> float:
    """A local job's steady-state images/s from its commit times (the mtimes of
    ``metadata/NNNNN.parquet``): rows committed after the first shard ÷ first-to-last commit
    time, so start-up (Ray, the actor, model load, warm-up) is excluded."""
    from pathlib import Path

    commits = sorted(p.stat().st_mtime for p in (Path(out_dir) / "metadata").glob("*.parquet"))
    if len(commits) < 2:
        raise ValueError(f"{out_dir}: {len(commits)} commits; a steady-state rate needs at least two shards")
    return (rows_total - rows_first_shard) / (commits[-1] - commits[0])


def seconds_each(items: list, work) -> tuple[float, list]:
    """Mean wall seconds of ``work(item)`` over ``items``, run one after another (warm up before:
    this times every call), and what the calls returned."""
    started = time.perf_counter()
    results = [work(item) for item in items]
    return (time.perf_counter() - started) / len(items), results


def alternate_in_fresh_processes(script: str, contenders: Sequence[str], repeat: int, args: Sequence[str],
                                 env: dict[str, str] | None = None) -> Iterator[tuple[int, str, str]]:
    """Run ``script --child CONTENDER ARGS`` in a fresh process for each contender, ``repeat`` rounds, the
    contenders' order reversed every other round (a machine whose load drifts affects them alike); yields
    (round, contender, the child's stdout) as each finishes."""
    for round_ in range(1, repeat + 1):
        for contender in contenders if round_ % 2 else reversed(contenders):
            done = subprocess.run([sys.executable, script, "--child", contender, *args], capture_output=True,
                                  text=True, check=True, cwd=Path(script).resolve().parent.parent, env=env)
            yield round_, contender, done.stdout
