"""Chaos for the test suite: workers killed, hung or failing, a driver dying mid-merge.

Off unless ``SDBATCH_TEST_CHAOS`` (faults.ENV_CHAOS) holds JSON such as ``{"kill_fraction":
0.1, "seed": 1, "hang_shards": ["00002"], "fail_shards": ["00003"], "broken_shards": ["00004"],
"hold_shards": ["00000"], "marker_dir": "/tmp/x", "driver_exit_at": "merge", "hang_loads": 1,
"ray_node_start_timeout": true,
"kill_tracker_after_commits": 1, "deadline_after_ready_s": 10}``: the worker process exits after
the chosen fraction of batches (a hash of seed, shard, batch and attempt picks them), listed shards hang on their
first attempt, fail on every attempt with a transient storage error (``fail_shards``) or with
a deterministic one (``broken_shards``: a ``RuntimeError``, as a bug or a bad input would),
held shards wait once started until a file ``release`` exists in ``marker_dir``, the first
``hang_loads`` model loads stop their worker process (SIGSTOP), the local Ray node the driver
starts times out (``ray_node_start_timeout``), the driver
dies halfway through writing the index, the driver's progress tracker actor is killed once
that many shards are committed, the job's ``--deadline`` is moved to that many seconds after the
first worker has loaded its model (``deadline_after_ready_s``: the moment is written to
``marker_dir``/deadline_at, so a test knows when it passes however slowly the model loaded), and
each injected fault leaves a file in ``marker_dir`` so a test can count them.

``install_from_env()`` wraps ``ShardRunner``'s shard methods (in a Ray worker process, where
faults.setup_process runs it as Ray's ``worker_process_setup_hook``) and the driver's index
merge, its marking of ready workers and its result collection (in the CLI process, where tests/integration/faulty_sdbatch.py runs it). The
package knows nothing of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import time
from typing import Any

from integration.faults import ENV_CHAOS
from sdbatch.storage.base import StorageError


class Chaos:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.batches: dict[tuple[str, int], int] = {}
        self.tracker_killed = False
        self.deadline_moved = False

    def _mark(self, kind: str, shard_name: str, attempt: int, detail: str = "") -> None:
        folder = self.config.get("marker_dir")
        if folder:
            name = f"{kind}-{shard_name}-a{attempt}{detail}-{os.getpid()}"
            open(os.path.join(folder, name), "w").close()

    def before_shard(self, shard_name: str, attempt: int) -> None:
        if shard_name in self.config.get("fail_shards", ()):
            self._mark("fail", shard_name, attempt)
            raise StorageError(f"injected failure of shard {shard_name}", transient=True)  # an outage: retried
        if shard_name in self.config.get("broken_shards", ()):
            self._mark("broken", shard_name, attempt)
            raise RuntimeError(f"injected deterministic failure of shard {shard_name}")  # would fail every attempt
        if shard_name in self.config.get("hang_shards", ()) and attempt == 1:
            self._mark("hang", shard_name, attempt)
            time.sleep(3600)
        if shard_name in self.config.get("hold_shards", ()):
            self._mark("hold", shard_name, attempt)
            while not os.path.exists(os.path.join(self.config["marker_dir"], "release")):
                time.sleep(0.1)

    def before_load(self) -> None:
        """The first ``hang_loads`` model loads of the job stop their worker process (SIGSTOP,
        as a load stuck in the kernel would): it never answers, and only a kill ends it."""
        folder = self.config["marker_dir"]
        if len([n for n in os.listdir(folder) if n.startswith("hangload-")]) < self.config.get("hang_loads", 0):
            self._mark("hangload", "model", 0)
            os.kill(os.getpid(), signal.SIGSTOP)

    def after_batch(self, shard_name: str, attempt: int) -> None:
        fraction = self.config.get("kill_fraction", 0)
        if not fraction:
            return
        number = self.batches[(shard_name, attempt)] = self.batches.get((shard_name, attempt), -1) + 1
        digest = hashlib.sha256(f"{self.config.get('seed', 0)}:{shard_name}:{number}:{attempt}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
            self._mark("kill", shard_name, attempt, f"-b{number}")
            os._exit(1)

    def after_collect(self, driver: Any) -> None:
        after = self.config.get("kill_tracker_after_commits")
        if after is not None and driver.schedule.shards_committed >= after and not self.tracker_killed:
            import ray

            self.tracker_killed = True
            self._mark("tracker", "driver", 0)
            ray.kill(driver.tracker)

    def after_start_ready(self, driver: Any, pool: list) -> None:
        after = self.config.get("deadline_after_ready_s")
        if after is None or self.deadline_moved or not any(actor.is_ready for actor in pool):
            return
        # before the driver's first dispatch: every shard is handed out with the moved deadline
        self.deadline_moved = True
        driver.deadline = driver.schedule.deadline = time.time() + after
        with open(os.path.join(self.config["marker_dir"], "deadline_at"), "w") as f:
            f.write(repr(driver.deadline))

    def before_merge(self, storage: Any) -> None:
        if self.config.get("driver_exit_at") == "merge":
            storage.put("index.parquet", b"PAR1-truncated-by-test")
            self._mark("driver", "merge", 0)
            os._exit(137)

    # -- wiring --------------------------------------------------------------------------------
    def wrap_shard_method(self, method):
        """``ShardRunner.run_shard`` (a shard, or --retry-failed rows of one) with this chaos before the shard and after
        each batch (the call comes after the actor reported the shard started)."""

        @functools.wraps(method)
        def run(runner, shard, rows, attempt=1, on_batch=None, **kwargs):
            def report(done: int, failed: int) -> None:
                if on_batch:
                    on_batch(done, failed)
                self.after_batch(shard.name, attempt)

            self.before_shard(shard.name, attempt)
            return method(runner, shard, rows, attempt, on_batch=report, **kwargs)

        return run

    def slow_ray_node(self) -> None:
        """``ray_node_start_timeout``: the local Ray node never registers with its GCS, and the
        30 s Ray waits for it (``ray._private.node``, not configurable) pass at once — Ray then
        raises its own "timed out during startup" error."""
        import types

        import ray._private.node
        import ray._private.services

        def unregistered(*args, **kwargs):
            raise RuntimeError("injected: the raylet has not registered with the GCS")

        clock = [time.monotonic()]

        def jumping_monotonic() -> float:
            clock[0] += 31.0
            return clock[0]

        ray._private.services.get_node = unregistered
        ray._private.node.time = types.SimpleNamespace(**{**vars(time), "monotonic": jumping_monotonic})
        self._mark("raystart", "driver", 0)

    def install(self) -> None:
        from sdbatch.run import driver as scheduler
        from sdbatch.run import shard_runner as worker

        if self.config.get("ray_node_start_timeout"):
            self.slow_ray_node()

        worker.ShardRunner.run_shard = self.wrap_shard_method(worker.ShardRunner.run_shard)
        if self.config.get("hang_loads"):  # imports torch: only in the jobs that ask for it
            from sdbatch.models import runtime

            load = runtime.load  # what the worker calls for a model that runs on torch

            def hang_then_load(*args, **kwargs):
                self.before_load()
                return load(*args, **kwargs)

            runtime.load = hang_then_load
        merge = scheduler.merge_index

        def merge_index(storage, *args, **kwargs):
            self.before_merge(storage)
            return merge(storage, *args, **kwargs)

        scheduler.merge_index = merge_index
        collect = scheduler.Driver._collect

        def collect_then_chaos(driver, pool):
            pool = collect(driver, pool)
            self.after_collect(driver)
            return pool

        scheduler.Driver._collect = collect_then_chaos
        start_ready = scheduler.Driver._start_ready

        def start_ready_then_chaos(driver, pool):
            pool = start_ready(driver, pool)
            self.after_start_ready(driver, pool)
            return pool

        scheduler.Driver._start_ready = start_ready_then_chaos


def install_from_env() -> Chaos | None:
    raw = os.environ.get(ENV_CHAOS)
    if not raw:
        return None
    chaos = Chaos(json.loads(raw))
    chaos.install()
    return chaos


def chaos_env(marker_dir: os.PathLike, **config: Any) -> dict[str, str]:
    """The environment of a CLI run with this chaos (``marker_dir`` must exist)."""
    return {ENV_CHAOS: json.dumps({"marker_dir": str(marker_dir), **config})}
