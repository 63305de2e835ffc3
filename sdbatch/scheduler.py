"""The Ray driver loop: the single owner of scheduling decisions.

It connects to Ray, takes the job lock, subtracts committed shards (storage is the single
owner of truth about what is done), starts the worker actors and keeps each fed with at
most ``PREFETCH_DEPTH`` shards, so a worker pulls its next shard while finishing the current
one. Failures are classified: a dead actor (process exit, lost node) or a failed shard
task re-queues the shard with a bounded number of attempts; a shard with no progress past
the hang deadline has its actor replaced. When every shard is committed it merges the
index and writes ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

import sdbatch
from sdbatch.manifest import Manifest, read_rows
from sdbatch.output import (
    LOCK_KEY,
    SUCCESS_KEY,
    STATUS_FAILED,
    claim_job,
    committed_shards,
    merge_index,
    read_json,
    write_json,
)
from sdbatch.plan import ShardSpec, num_shards, pending_shards, shard
from sdbatch.progress import ProgressFeed, utc_now
from sdbatch.spec import JobSpec
from sdbatch.storage import Storage
from sdbatch.worker import ShardResult, WorkerActor

log = logging.getLogger("sdbatch.scheduler")

PREFETCH_DEPTH = 2  # shards handed to one actor at a time: the running one and the next
LOCK_LEASE_S = 60.0
HEARTBEAT_S = 10.0
MIN_HANG_TIMEOUT_S = 300.0

# exit codes, documented in the README and `sdbatch submit --help`
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ROWS_FAILED = 3  # finished; some rows failed permanently (rerun with --retry-failed)
EXIT_STOPPED = 4  # stopped at --deadline; rerun to resume
EXIT_SHARDS_FAILED = 5  # some shards failed on every attempt; rerun to retry them
EXIT_INTERRUPTED = 130


class LockHeld(RuntimeError):
    """Another live driver holds the job lock on OUT."""


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Collects per-batch reports from workers: live progress and the watchdog's heartbeat."""

    def __init__(self) -> None:
        self.shards: dict[str, list[Any]] = {}  # shard -> [done, failed, last report time, worker]

    def report(self, worker: str, shard_name: str, done: int, failed: int) -> None:
        entry = self.shards.setdefault(shard_name, [0, 0, 0.0, worker])
        if entry[3] != worker:  # a new attempt on another worker starts from zero
            entry[:] = [0, 0, 0.0, worker]
        entry[0] += done
        entry[1] += failed
        entry[2] = time.time()

    def forget(self, shard_name: str) -> None:
        self.shards.pop(shard_name, None)

    def snapshot(self) -> dict[str, list[Any]]:
        return self.shards


@dataclass
class JobLock:
    storage: Storage
    owner: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, storage: Storage) -> JobLock:
        owner = {"driver": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started_at": utc_now()}
        lock = cls(storage, owner)
        body = lock._body()
        if not storage.put_new(LOCK_KEY, body).created:
            held = read_json(storage, LOCK_KEY) or {}
            if not _lock_is_stale(held):
                raise LockHeld(
                    f"{storage.url} is being written by another sdbatch driver "
                    f"(host {held.get('host')}, pid {held.get('pid')}, last heartbeat {held.get('heartbeat_at')}). "
                    f"Wait for it to finish, or for its lease to expire ({int(LOCK_LEASE_S)} s after its last "
                    "heartbeat) if it died."
                )
            log.warning("taking over the expired lock of driver %s on %s", held.get("driver"), held.get("host"))
            storage.put(LOCK_KEY, body)
        lock._thread = threading.Thread(target=lock._heartbeat, name="sdbatch-lock", daemon=True)
        lock._thread.start()
        return lock

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({**self.owner, "heartbeat_at": now, "expires_at": now + LOCK_LEASE_S}).encode()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.storage.put(LOCK_KEY, self._body())
            except Exception as exc:  # a missed heartbeat is survivable; the lease is 6 beats long
                log.warning("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        held = read_json(self.storage, LOCK_KEY) or {}
        if held.get("driver") == self.owner["driver"]:
            self.storage.delete(LOCK_KEY)


def _lock_is_stale(held: dict[str, Any]) -> bool:
    if held.get("expires_at", 0) < time.time():
        return True
    if held.get("host") == socket.gethostname():  # same machine: a dead pid cannot heartbeat
        try:
            os.kill(int(held.get("pid", -1)), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
    return False


def connect_ray(address: str | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1",  # a job-local cluster talks over loopback only
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


@dataclass
class _InFlight:
    shard: ShardSpec
    attempt: int
    future: Any


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
    ):
        self.address = address
        self.spec = spec
        self.manifest = manifest
        self.storage = storage
        self.job = job
        self.endpoint_url = endpoint_url
        self.deadline = deadline
        self.interactive = interactive
        self.spec_json = spec.model_dump_json()

    def _new_actor(self, tracker: Any) -> Any:
        res = self.spec.resources
        return WorkerActor.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0).remote(
            self.spec_json, self.storage.url, self.job["fingerprint"], self.endpoint_url, tracker
        )

    def run(self) -> JobOutcome:
        started = time.monotonic()
        total_rows = self.manifest.num_rows
        rps = self.spec.resources.rows_per_shard
        committed = committed_shards(self.storage)
        queue: deque[tuple[ShardSpec, int]] = deque((s, 1) for s in pending_shards(total_rows, rps, committed))
        skipped = len(committed)
        done_before = sum(shard(int(n), total_rows, rps).num_rows for n in committed if int(n) < num_shards(total_rows, rps))
        if not queue:
            return self._finish(started, skipped, 0, 0, [], "nothing to generate: every shard is already committed")
        connect_ray(self.address)
        log.info("%d shards to generate, %d already committed", len(queue), skipped)

        progress = ProgressFeed(
            self.storage, total_rows=total_rows, rows_already_done=done_before,
            shards_total=num_shards(total_rows, rps), shards_committed=skipped, interactive=self.interactive,
        )
        tracker = ProgressTracker.remote()
        n_workers = fit_workers(self.spec)
        actors: dict[Any, list[_InFlight]] = {self._new_actor(tracker): [] for _ in range(n_workers)}
        rows_ok = rows_failed = 0
        failed_shards: list[str] = []
        shards_committed = skipped
        hang_timeout = self.spec.retries.hang_timeout_s
        state = "finished"
        try:
            while queue or any(actors.values()):
                past_deadline = self.deadline is not None and time.time() >= self.deadline
                if past_deadline and queue:
                    log.warning("deadline reached: no new shards; %d shards left for a rerun", len(queue))
                    queue.clear()
                    state = "stopped"
                for actor, inflight in actors.items():
                    while queue and len(inflight) < PREFETCH_DEPTH:
                        spec_shard, attempt = queue.popleft()
                        rows = read_rows(self.manifest, self.spec, spec_shard.start, spec_shard.stop)
                        inflight.append(_InFlight(spec_shard, attempt, actor.run_shard.remote(spec_shard, rows, attempt)))
                futures = [f.future for fl in actors.values() for f in fl]
                ready, _ = ray.wait(futures, num_returns=len(futures), timeout=1.0)
                ready_set = set(ready)
                dead: list[Any] = []
                for actor in list(actors):
                    for item in [f for f in actors[actor] if f.future in ready_set]:
                        actors[actor].remove(item)
                        tracker.forget.remote(item.shard.name)
                        try:
                            result: ShardResult = ray.get(item.future)
                        except RayActorError as exc:
                            log.warning("worker died running shard %s (attempt %d): %s", item.shard.name, item.attempt, _short(exc))
                            self._requeue(queue, failed_shards, item, exc)
                            dead.append(actor)
                            continue
                        except RayTaskError as exc:
                            log.warning("shard %s failed (attempt %d): %s", item.shard.name, item.attempt, _short(exc))
                            self._requeue(queue, failed_shards, item, exc)
                            continue
                        shards_committed += 1
                        if result.committed:
                            rows_ok += result.rows_ok
                            rows_failed += result.rows_failed
                        if result.rows_failed:
                            log.warning("shard %s: %d rows failed permanently", result.shard, result.rows_failed)
                for actor in dict.fromkeys(dead):
                    self._replace(actors, actor, tracker, queue, failed_shards, count_attempt=False)
                live = ray.get(tracker.snapshot.remote())
                self._watchdog(actors, live, tracker, queue, failed_shards, hang_timeout)
                in_flight_done = sum(e[0] for e in live.values())
                in_flight_failed = sum(e[1] for e in live.values())
                progress.update(
                    rows_ok + in_flight_done, rows_failed + in_flight_failed,
                    shards_committed=shards_committed, shards_failed=len(failed_shards), workers=len(actors),
                )
        except KeyboardInterrupt:
            progress.close("interrupted")
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
        progress.update(rows_ok, rows_failed, shards_committed=shards_committed, shards_failed=len(failed_shards), workers=0)
        if state == "stopped":
            progress.close("stopped")
            return JobOutcome(EXIT_STOPPED, total_rows, rows_ok, rows_failed, skipped, failed_shards,
                              time.monotonic() - started, "stopped at the deadline; run the same command again to resume")
        if failed_shards:
            progress.close("incomplete")
            return JobOutcome(EXIT_SHARDS_FAILED, total_rows, rows_ok, rows_failed, skipped, failed_shards,
                              time.monotonic() - started,
                              f"{len(failed_shards)} shards failed on every attempt; run the same command again to retry them")
        outcome = self._finish(started, skipped, rows_ok, rows_failed, failed_shards, "")
        progress.close("finished")
        return outcome

    def _requeue(self, queue: deque, failed_shards: list[str], item: _InFlight, exc: BaseException) -> None:
        if item.attempt >= self.spec.retries.shard_attempts:
            log.error("shard %s failed on all %d attempts; last error: %s", item.shard.name, item.attempt, _short(exc))
            failed_shards.append(item.shard.name)
        else:
            queue.appendleft((item.shard, item.attempt + 1))

    def _replace(self, actors: dict, actor: Any, tracker: Any, queue: deque, failed_shards: list[str], *, count_attempt: bool) -> None:
        """Kill ``actor``, give its remaining shards back to the queue, start a fresh one."""
        for item in actors.pop(actor, []):
            tracker.forget.remote(item.shard.name)
            if count_attempt:
                self._requeue(queue, failed_shards, item, TimeoutError("worker replaced"))
            else:  # never started on the dead actor: same attempt number
                queue.appendleft((item.shard, item.attempt))
        ray.kill(actor)
        actors[self._new_actor(tracker)] = []

    def _watchdog(self, actors: dict, live: dict, tracker: Any, queue: deque, failed_shards: list[str], hang_timeout: float | None) -> None:
        timeout = hang_timeout or MIN_HANG_TIMEOUT_S
        now = time.time()
        for actor in list(actors):
            inflight = actors[actor]
            if not inflight:
                continue
            head = inflight[0]
            entry = live.get(head.shard.name)
            if entry is None or now - entry[2] < timeout:
                continue
            log.warning("shard %s made no progress for %.0f s: replacing its worker", head.shard.name, now - entry[2])
            inflight.remove(head)
            self._requeue(queue, failed_shards, head, TimeoutError(f"no progress for {timeout:.0f} s"))
            self._replace(actors, actor, tracker, queue, failed_shards, count_attempt=False)

    def _finish(self, started: float, skipped: int, rows_ok: int, rows_failed: int, failed_shards: list[str], message: str) -> JobOutcome:
        previous = read_json(self.storage, SUCCESS_KEY) if rows_ok == rows_failed == 0 else None
        if previous is not None:  # a finished job run again: leave its record alone
            code = EXIT_ROWS_FAILED if previous.get("rows_failed") else EXIT_OK
            return JobOutcome(code, self.manifest.num_rows, 0, 0, skipped, [], time.monotonic() - started, message)
        index = merge_index(self.storage)
        total = self.manifest.num_rows
        failed_total = 0
        if "status" in index.column_names:
            failed_total = sum(1 for s in index.column("status").to_pylist() if s == STATUS_FAILED)
        wall = time.monotonic() - started
        summary = {
            "rows_total": total,
            "rows_in_index": index.num_rows,
            "rows_ok": index.num_rows - failed_total,
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
        return JobOutcome(code, total, rows_ok, rows_failed, skipped, failed_shards, wall, message)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__


def run_job(
    spec: JobSpec,
    manifest: Manifest,
    storage: Storage,
    job: dict[str, Any],
    *,
    address: str | None = None,
    endpoint_url: str | None = None,
    deadline: float | None = None,
    interactive: bool | None = None,
) -> JobOutcome:
    """Claim OUT, lock it, run every pending shard, and finish the index."""
    claim_job(storage, job)
    lock = JobLock.acquire(storage)
    try:
        return Driver(spec, manifest, storage, job, address=address, endpoint_url=endpoint_url, deadline=deadline, interactive=interactive).run()
    finally:
        lock.release()
