"""The Ray driver loop: the single owner of scheduling decisions.

It connects to Ray, takes the job lock, subtracts committed shards (storage is the single
owner of truth about what is done), starts the worker actors and keeps each fed with at
most ``PREFETCH_DEPTH`` shards, so a worker pulls its next shard while finishing the current
one. Failures are classified: a dead actor (process exit, lost node) or a failed shard
task re-queues the shard with a bounded number of attempts; a shard with no progress past
the hang deadline has its actor replaced. At ``--deadline`` it hands out no more shards, and
a shard handed out but not yet started by then is not started either (the actor returns it
``deferred``); shards already running finish and commit, the rest are left for a rerun.
When every shard is committed it merges the index and writes ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import sdbatch
from sdbatch.lock import JobLock
from sdbatch.manifest import Manifest, passthrough_types, read_rows
from sdbatch.output import (
    SUCCESS_KEY,
    STATUS_FAILED,
    claim_job,
    clear_job,
    committed_shards,
    merge_index,
    read_json,
    read_shard_index,
    write_json,
)
from sdbatch.plan import ShardSpec, num_shards, pending_shards, shard
from sdbatch.progress import ProgressFeed, utc_now
from sdbatch.spec import JobSpec
from sdbatch.storage import Storage
from sdbatch.worker import ShardResult, TestChaos, WorkerActor

log = logging.getLogger("sdbatch.scheduler")

PREFETCH_DEPTH = 2  # shards handed to one actor at a time: the running one and the next
MIN_HANG_TIMEOUT_S = 300.0  # first batches include warm-up; a GPU batch rarely takes minutes
HANG_FACTOR = 10.0
MAX_START_FAILURES = 5

# exit codes, documented in the README and `sdbatch submit --help`
EXIT_OK = 0
EXIT_ROWS_FAILED = 3  # finished; some rows failed permanently (rerun with --retry-failed)
EXIT_STOPPED = 4  # stopped at --deadline; rerun to resume
EXIT_SHARDS_FAILED = 5  # some shards failed on every attempt; rerun to retry them


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Collects per-batch reports from workers: live progress and the watchdog's heartbeat."""

    def __init__(self) -> None:
        self.shards: dict[str, list[Any]] = {}  # shard -> [done, failed, last report time, worker]
        self.slowest_batch = 0.0  # the longest gap between two reports of one shard, seconds

    def report(self, worker: str, shard_name: str, done: int, failed: int) -> None:
        now = time.time()
        entry = self.shards.setdefault(shard_name, [0, 0, now, worker])
        if entry[3] != worker:  # a new attempt on another worker starts from zero
            entry[:] = [0, 0, now, worker]
        if done or failed:
            self.slowest_batch = max(self.slowest_batch, now - entry[2])
        entry[0] += done
        entry[1] += failed
        entry[2] = now

    def forget(self, shard_name: str) -> None:
        self.shards.pop(shard_name, None)

    def snapshot(self) -> tuple[dict[str, list[Any]], float]:
        return self.shards, self.slowest_batch


def connect_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:  # loopback only: see sdbatch.cli.local_ray_environment, which ran before ray was imported
        ray.init(
            include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
        )


def fit_workers(spec: JobSpec) -> int:
    """As many workers as asked for, but no more than the cluster can place (else they would
    wait for resources forever)."""
    res = ray.cluster_resources()
    wanted = spec.resources.workers
    fit = int(res.get("CPU", 0) // spec.resources.cpus_per_worker)
    if spec.resources.gpus_per_worker > 0:
        fit = min(fit, int(res.get("GPU", 0) // spec.resources.gpus_per_worker))
    if fit < 1:
        raise RuntimeError(
            f"the Ray cluster ({res.get('CPU', 0)} CPUs, {res.get('GPU', 0)} GPUs) cannot place one worker "
            f"needing {spec.resources.cpus_per_worker} CPUs and {spec.resources.gpus_per_worker} GPUs"
        )
    if fit < wanted:
        log.warning("the cluster fits %d of the %d workers asked for; using %d", fit, wanted, fit)
    return min(wanted, fit)


@dataclass
class JobOutcome:
    exit_code: int
    rows_total: int
    rows_generated: int
    rows_failed: int
    shards_skipped: int
    shards_failed: list[str]
    wall_seconds: float
    message: str


class WorkerStartError(RuntimeError):
    """Workers cannot start (e.g. the model fails to load on them), or loaded another model."""


def check_worker_model(ready: dict[str, Any], job: dict[str, Any]) -> None:
    """A worker gets shards only if the model it loaded is the one the job pinned at submit."""
    pinned = job["model"]["fingerprint"]
    if ready.get("model_pin") != pinned:
        raise WorkerStartError(
            f"worker {ready.get('worker')} loaded model {job['model']['name']!r} pinned {ready.get('model_pin')}, "
            f"but the job was submitted with {pinned}: the model changed since. Nothing more was generated; "
            "restore the model, or submit to a new --out (or with --new-run) to use the new one"
        )


@dataclass
class _Work:
    shard: ShardSpec
    attempt: int = 1
    retry_ids: frozenset[str] | None = None  # --retry-failed: regenerate only these rows
    future: Any = None


@dataclass
class _Actor:
    handle: Any
    ready: Any  # ObjectRef of handle.ready(): resolves once the model is loaded
    is_ready: bool = False
    inflight: list[_Work] = field(default_factory=list)


class Driver:
    def __init__(
        self,
        spec: JobSpec,
        manifest: Manifest,
        storage: Storage,
        job: dict[str, Any],
        *,
        address: str | None = None,
        endpoint_url: str | None = None,
        deadline: float | None = None,
        interactive: bool | None = None,
        retry_failed: bool = False,
        lock: JobLock | None = None,
    ):
        self.retry_failed = retry_failed
        self.lock = lock
        self.address = address
        self.spec = spec
        self.manifest = manifest
        self.storage = storage
        self.job = job
        self.endpoint_url = endpoint_url
        self.deadline = deadline  # epoch seconds: no shard starts at or after it
        self.deadline_passed = False
        self.interactive = interactive
        self.spec_json = spec.model_dump_json()

    def run(self) -> JobOutcome:
        started = time.monotonic()
        total_rows = self.manifest.num_rows
        rps = self.spec.resources.rows_per_shard
        committed = committed_shards(self.storage)
        queue: deque[_Work] = deque(_Work(s) for s in pending_shards(total_rows, rps, committed))
        if self.retry_failed:
            queue.extend(self._failed_rows_work(committed))
        skipped = len(committed)
        done_before = sum(shard(int(n), total_rows, rps).num_rows for n in committed if int(n) < num_shards(total_rows, rps))
        if not queue:
            return self._finish(started, skipped, 0, 0, "nothing to generate: every shard is already committed")
        connect_ray(self.address)
        log.info("%d shards to generate, %d already committed", len(queue), skipped)

        progress = ProgressFeed(
            self.storage, total_rows=total_rows, rows_already_done=done_before,
            shards_total=num_shards(total_rows, rps), shards_committed=skipped, interactive=self.interactive,
        )
        # pinned to the driver's node: losing a worker node must not take the tracker with it
        self.tracker = ProgressTracker.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ).remote()
        self.queue = queue
        self.failed_shards: list[str] = []
        self.start_failures = 0
        pool = [self._new_actor() for _ in range(fit_workers(self.spec))]
        rows_ok = rows_failed = regenerated = 0
        shards_committed = skipped
        shards_left = 0  # not started because of the deadline; a rerun does them
        try:
            while queue or any(a.inflight for a in pool):
                if self.lock is not None:
                    self.lock.check()
                if queue and self._past_deadline():
                    log.warning("deadline reached: starting no new shards; %d queued shards left for a rerun", len(queue))
                    shards_left += len(queue)
                    queue.clear()
                pool = self._start_ready(pool)
                for actor in pool:
                    while actor.is_ready and queue and len(actor.inflight) < PREFETCH_DEPTH:
                        self._dispatch(actor, queue.popleft())
                futures = [w.future for a in pool for w in a.inflight]
                ready = set(ray.wait(futures, num_returns=len(futures), timeout=1.0)[0]) if futures else set()
                if not futures:
                    time.sleep(0.5)
                dead = []
                for actor in pool:
                    for item in [w for w in actor.inflight if w.future in ready]:
                        if actor in dead:  # shards queued behind the one it died running: _replace
                            break
                        actor.inflight.remove(item)
                        self.tracker.forget.remote(item.shard.name)
                        try:
                            result: ShardResult = ray.get(item.future)
                        except RayActorError as exc:
                            log.warning("worker died running shard %s (attempt %d): %s", item.shard.name, item.attempt, _short(exc))
                            self._requeue(item, exc)
                            dead.append(actor)
                            continue
                        except RayTaskError as exc:
                            log.warning("shard %s failed (attempt %d): %s", item.shard.name, item.attempt, _short(exc))
                            self._requeue(item, exc)
                            continue
                        if result.deferred:  # reached its worker after the deadline: nothing was written
                            log.info("shard %s not started: the deadline had passed", item.shard.name)
                            self.deadline_passed = True  # the worker's clock says so, whatever ours says
                            shards_left += 1
                            continue
                        shards_committed += item.retry_ids is None
                        if result.committed:
                            rows_ok += result.rows_ok
                            rows_failed += result.rows_failed
                        else:
                            regenerated += 1
                        if result.rows_failed:
                            log.warning("shard %s: %d rows failed permanently", result.shard, result.rows_failed)
                pool = [self._replace(a) if a in dead else a for a in pool]
                live, slowest_batch = ray.get(self.tracker.snapshot.remote())
                pool = self._watchdog(pool, live, slowest_batch)
                progress.update(
                    rows_ok + sum(e[0] for e in live.values()), rows_failed + sum(e[1] for e in live.values()),
                    shards_committed=shards_committed, shards_failed=len(self.failed_shards), workers=len(pool),
                )
        except BaseException as exc:  # progress.json must not go on saying "running"
            progress.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
            raise
        finally:
            for actor in pool:
                ray.kill(actor.handle)
        if regenerated:
            log.warning("%d shards had been committed by an earlier attempt; their results were kept", regenerated)
        progress.update(rows_ok, rows_failed, shards_committed=shards_committed, shards_failed=len(self.failed_shards), workers=0)
        failed_shards = self.failed_shards
        if shards_left:
            progress.close("stopped")
            return JobOutcome(EXIT_STOPPED, total_rows, rows_ok, rows_failed, skipped, failed_shards,
                              time.monotonic() - started,
                              f"stopped at the deadline with {shards_left} shards left; run the same command again to resume")
        if failed_shards:
            progress.close("incomplete")
            return JobOutcome(EXIT_SHARDS_FAILED, total_rows, rows_ok, rows_failed, skipped, failed_shards,
                              time.monotonic() - started,
                              f"shards {', '.join(sorted(failed_shards))} failed on every attempt "
                              "(see the log for their last error); run the same command again to retry them")
        outcome = self._finish(started, skipped, rows_ok, rows_failed, "")
        progress.close("finished")
        return outcome

    def _new_actor(self) -> _Actor:
        res = self.spec.resources
        # test-only fault injection settings must reach the actors' processes
        test_env = {k: v for k, v in os.environ.items() if k.startswith("SDBATCH_TEST_")}
        options: dict[str, Any] = {"num_cpus": res.cpus_per_worker, "num_gpus": res.gpus_per_worker, "max_restarts": 0}
        if test_env:
            options["runtime_env"] = {"env_vars": test_env}
        handle = WorkerActor.options(**options).remote(
            self.spec_json, self.storage.url, self.endpoint_url, self.tracker,
            self.job["fingerprint"], self.job["model"]["fingerprint"],
        )
        return _Actor(handle, handle.ready.remote())

    def _start_ready(self, pool: list[_Actor]) -> list[_Actor]:
        """Mark actors whose model has loaded as ready. Work goes only to ready actors, so an
        actor that cannot be placed (a lost node's capacity) holds no shards hostage."""
        waiting = [a for a in pool if not a.is_ready]
        if not waiting:
            return pool
        done = set(ray.wait([a.ready for a in waiting], num_returns=len(waiting), timeout=0)[0])
        fresh = []
        for actor in pool:
            if actor.is_ready or actor.ready not in done:
                fresh.append(actor)
                continue
            try:
                check_worker_model(ray.get(actor.ready), self.job)
                actor.is_ready = True
                fresh.append(actor)
            except RayActorError as exc:
                self.start_failures += 1
                if self.start_failures > MAX_START_FAILURES:
                    raise WorkerStartError(f"workers keep failing to start; last error: {_short(exc)}") from None
                log.warning("a worker failed to start: %s", _short(exc))
                fresh.append(self._replace(actor))
        return fresh

    def _dispatch(self, actor: _Actor, work: _Work) -> None:
        rows = read_rows(self.manifest, self.spec, work.shard.start, work.shard.stop)
        if work.retry_ids is not None:
            rows = [r for r in rows if r.id in work.retry_ids]
        work.future = actor.handle.run_shard.remote(
            work.shard, rows, work.attempt, work.retry_ids is not None, not_after=self.deadline
        )
        actor.inflight.append(work)

    def _past_deadline(self) -> bool:
        return self.deadline_passed or (self.deadline is not None and time.time() >= self.deadline)

    def _failed_rows_work(self, committed: set[str]) -> list[_Work]:
        """--retry-failed: one unit of work per committed shard that holds failed rows."""
        work = []
        rps = self.spec.resources.rows_per_shard
        for name in sorted(committed, key=int):
            table = read_shard_index(self.storage, name, self.job["fingerprint"])
            failed = [i for i, s in zip(table.column("id").to_pylist(), table.column("status").to_pylist()) if s == STATUS_FAILED]
            if failed:
                work.append(_Work(shard(int(name), self.manifest.num_rows, rps), retry_ids=frozenset(failed)))
        if work:  # the job is no longer finished until the retried rows are committed
            log.info("retrying the failed rows of %d shards", len(work))
            self.storage.delete(SUCCESS_KEY)
        return work

    def _requeue(self, item: _Work, exc: BaseException) -> None:
        if item.attempt >= self.spec.retries.shard_attempts:
            log.error("shard %s failed on all %d attempts; last error: %s", item.shard.name, item.attempt, _short(exc))
            self.failed_shards.append(item.shard.name)
        else:
            self.queue.appendleft(_Work(item.shard, item.attempt + 1, item.retry_ids))

    def _replace(self, actor: _Actor) -> _Actor:
        """Kill ``actor``, give the shards queued behind on it back to the queue (same attempt:
        they never started), and start a fresh actor."""
        for item in actor.inflight:
            self.tracker.forget.remote(item.shard.name)
            self.queue.appendleft(_Work(item.shard, item.attempt, item.retry_ids))
        ray.kill(actor.handle)
        return self._new_actor()

    def _watchdog(self, pool: list[_Actor], live: dict, slowest_batch: float) -> list[_Actor]:
        """A shard with no batch reported for the hang timeout is hung: its actor is replaced.
        The timeout is ``retries.hang_timeout_s`` if set, else derived from the batch times
        measured so far (HANG_FACTOR × the slowest), never under MIN_HANG_TIMEOUT_S."""
        timeout = self.spec.retries.hang_timeout_s or max(MIN_HANG_TIMEOUT_S, HANG_FACTOR * slowest_batch)
        now = time.time()
        fresh = []
        for actor in pool:
            entry = live.get(actor.inflight[0].shard.name) if actor.inflight else None
            if entry is None or now - entry[2] < timeout:
                fresh.append(actor)
                continue
            head = actor.inflight.pop(0)
            log.warning("shard %s made no progress for %.0f s: replacing its worker", head.shard.name, now - entry[2])
            self.tracker.forget.remote(head.shard.name)
            self._requeue(head, TimeoutError(f"no progress for {timeout:.0f} s"))
            fresh.append(self._replace(actor))
        return fresh

    def _finish(self, started: float, skipped: int, rows_ok: int, rows_failed: int, message: str) -> JobOutcome:
        """Merge the index and write ``_SUCCESS`` (every shard is committed by now)."""
        previous = read_json(self.storage, SUCCESS_KEY) if rows_ok == rows_failed == 0 else None
        if previous is not None:  # a finished job run again: leave its record alone
            code = EXIT_ROWS_FAILED if previous.get("rows_failed") else EXIT_OK
            return JobOutcome(code, self.manifest.num_rows, 0, 0, skipped, [], time.monotonic() - started, message)
        TestChaos.from_env().before_merge(self.storage)
        if self.lock is not None:
            self.lock.check()
        index = merge_index(self.storage, passthrough_types(self.manifest), self.job["fingerprint"])
        total = self.manifest.num_rows
        failed_total = index.rows_failed
        wall = time.monotonic() - started
        summary = {
            "rows_total": total,
            "rows_in_index": index.rows,
            "rows_ok": index.rows - failed_total,
            "rows_failed": failed_total,
            "rows_generated_this_run": rows_ok,
            "shards_skipped": skipped,
            "wall_seconds_this_run": round(wall, 2),
            "images_per_second_this_run": round(rows_ok / wall, 3) if wall > 0 else None,
            "fingerprint": self.job["fingerprint"],
            "finished_at": utc_now(),
            "sdbatch_version": sdbatch.__version__,
        }
        write_json(self.storage, SUCCESS_KEY, summary)
        code = EXIT_ROWS_FAILED if failed_total else EXIT_OK
        if failed_total:
            message = f"{failed_total} rows failed permanently (status=failed in index.parquet); rerun with --retry-failed"
        return JobOutcome(code, total, rows_ok, rows_failed, skipped, [], wall, message)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


def run_job(
    spec: JobSpec, manifest: Manifest, storage: Storage, job: dict[str, Any], *, new_run: bool = False,
    **options: Any,
) -> JobOutcome:
    """Lock OUT, claim it (under the lock, so of two drivers on an empty OUT one claims and the
    other is refused), run every pending shard, and finish the index. ``new_run`` first deletes
    the job OUT holds (only what its commits and index name, and its state files)."""
    lock = JobLock.acquire(storage)
    try:
        if new_run:
            deleted = clear_job(storage)
            log.warning("--new-run: deleted the previous job's %d objects under %s", deleted, storage.url)
        claim_job(storage, job)
        return Driver(spec, manifest, storage, job, lock=lock, **options).run()
    finally:
        lock.release()
