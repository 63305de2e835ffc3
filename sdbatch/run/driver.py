"""The Ray driver: the actor-pool mechanics around the scheduling policy (``policy.py``).

It connects to Ray, takes the job lock, subtracts committed shards (storage is the single
owner of truth about what is done), starts the worker actors and keeps each fed with at
most ``PREFETCH_DEPTH`` shards — only row ranges travel; each worker reads its own rows from
the manifest, and the next shard's while the current one generates. What comes back (a
result, a failed task, a dead actor, a shard with no progress past the hang timeout, a shard
``deferred`` by a worker because the deadline had passed) is handed to the ``Schedule``,
which decides what is requeued, charged, failed or left for a rerun. When every shard is
committed it merges the index and writes ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import sdbatch
from sdbatch.data.index import STATUS_FAILED
from sdbatch.errors import (
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_SHARDS_FAILED,
    EXIT_STOPPED,
    BadInput,
    JobFailed,
    SdbatchError,
)
from sdbatch.manifest.reader import passthrough_types
from sdbatch.manifest.sources import Manifest, ManifestChanged
from sdbatch.output.claim import claim_job, clear_job
from sdbatch.output.commits import committed_shards, shard_name
from sdbatch.output.documents import SUCCESS_KEY, JobRecord, Success, utc_now
from sdbatch.output.index import JobIndex, failed_rows_text, merge_index, open_index
from sdbatch.output.lock import JobLock
from sdbatch.output.quality import DuplicateRule
from sdbatch.run import metrics
from sdbatch.run.cluster import connect_ray, fit_workers, short_error, shut_down_job_local_cluster
from sdbatch.run.plan import job_plan
from sdbatch.run.policy import FINISHED, STOPPED, Schedule, Work, at_the_model, workers_to_start
from sdbatch.run.progress import ProgressFeed, plural
from sdbatch.run.protocol import PipelineError, ShardResult, describe, is_transient
from sdbatch.run.worker import SHARDS_PER_ACTOR, WorkerActor
from sdbatch.spec import JobSpec
from sdbatch.storage.base import Storage

log = logging.getLogger("sdbatch.scheduler")


PREFETCH_DEPTH = SHARDS_PER_ACTOR  # shards handed to one actor at a time (worker.SHARDS_PER_ACTOR)
MAX_START_FAILURES = 5


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Collects per-batch reports from workers: live progress and the watchdog's heartbeat."""

    def __init__(self) -> None:
        self.shards: dict[str, list[Any]] = {}  # shard -> [done, failed, last report time, worker]
        self.slowest_batch = 0.0  # the longest gap between two reports of one shard, seconds
        self.workers: dict[str, list[float]] = {}  # worker -> [rows done, rows failed, first report, last report]
        self.loading_since: dict[str, float] = {}  # actor id -> when it began loading the model

    def loading(self, actor_id: str) -> None:
        self.loading_since[actor_id] = time.time()

    def report(self, worker: str, shard_name: str, done: int, failed: int) -> None:
        now = time.time()
        tally = self.workers.setdefault(worker, [0, 0, now, now])
        tally[0] += done
        tally[1] += failed
        tally[3] = now
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

    def snapshot(self) -> tuple[dict[str, list[Any]], float, dict[str, list[float]], dict[str, float]]:
        return self.shards, self.slowest_batch, self.workers, self.loading_since


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
    batch_fill: float  # the plan's mean rows per batch ÷ batch size


class WorkerStartError(BadInput, RuntimeError):
    """Workers cannot start (e.g. the model fails to load on them), or loaded another model."""


class ModelLoadTimeout(JobFailed):
    """Worker after worker did not load the model within ``retries.load_timeout_s``."""


def check_worker_model(ready: dict[str, Any], job: JobRecord) -> None:
    """A worker gets shards only if it loaded the model (and refiner) the job pinned at submit."""
    if "refused" in ready:  # a bad input every worker would meet the same way (WorkerActor.ready)
        raise WorkerStartError(f"a worker could not start: {ready['refused']}")
    for kind, pinned in (("model", job.model), ("refiner", job.refiner)):
        loaded = ready.get(f"{kind}_pin")
        if pinned is not None and loaded != pinned.fingerprint:
            raise WorkerStartError(
                f"worker {ready.get('worker')} loaded {kind} {pinned.name!r} pinned {loaded}, but the job was "
                f"submitted with {pinned.fingerprint}: the {kind} changed since. Nothing more was generated; "
                f"restore the {kind}, or submit to a new --out (or with --new-run) to use the new one"
            )


@dataclass
class _Actor:
    handle: Any
    ready: Any  # ObjectRef of handle.ready(): resolves once the model is loaded
    is_ready: bool = False
    inflight: list[Work] = field(default_factory=list)  # handed to it, in order; they take turns at its model
    calls: int = 0  # run_shard calls handed to it so far: the next call's turn


class Driver:
    def __init__(
        self,
        spec: JobSpec,
        manifest: Manifest,
        storage: Storage,
        job: JobRecord,
        *,
        address: str | None = None,
        endpoint_url: str | None = None,
        deadline: float | None = None,
        interactive: bool | None = None,
        retry_failed: bool = False,
        repair: Callable[[Storage], dict[str, set[str]]] | None = None,
        lock: JobLock | None = None,
    ):
        self.retry_failed = retry_failed
        self.repair = repair
        self.lock = lock
        self.address = address
        self.spec = spec
        self.manifest = manifest
        self.storage = storage
        self.job = job
        self.endpoint_url = endpoint_url
        self.deadline = deadline  # epoch seconds: no shard starts at or after it
        self.interactive = interactive
        self.spec_json = spec.model_dump_json()
        self.start_failures = 0
        self.live: dict[str, list[Any]] = {}  # the tracker's last snapshot: shard -> [done, failed, last report, worker]

    def run(self) -> JobOutcome:
        started = time.monotonic()
        total_rows = self.manifest.num_rows
        self.plan = plan = job_plan(self.manifest, self.spec)
        committed = committed_shards(self.storage, plan.num_shards)
        log.info("planned %s, %s (mean %.1f rows per batch of %d)", plural(plan.num_shards, "shard"),
                 plural(plan.num_batches, "batch", "batches"), plan.batch_fill * plan.batch_size, plan.batch_size)
        pending = plan.pending(committed)
        retried = self._rows_work(committed) if self.retry_failed or self.repair else []
        skipped = len(committed)
        if not pending and not retried:
            log.info("nothing to generate: every shard is already committed")  # before the merge or report: a resume's cost
            return self._finish(started, skipped, 0, 0, "nothing to generate: every shard is already committed")
        self.schedule = schedule = Schedule(
            retried, shards=pending, max_attempts=self.spec.retries.shard_attempts, deadline=self.deadline,
            hang_timeout_s=self.spec.retries.hang_timeout_s, shards_committed=skipped,
        )
        connect_ray(self.address)
        metrics.start(self.storage.url)
        log.info("%s to generate, %d already committed", plural(len(schedule.queue), "shard"), skipped)
        done_before = total_rows - pending.num_rows
        done_before -= sum(len(w.retry_ids) for w in retried if w.retry_ids)  # counted again once regenerated ("9/8 done")
        progress = ProgressFeed(
            self.storage, total_rows=total_rows, rows_already_done=done_before,
            shards_total=plan.num_shards, shards_committed=skipped, interactive=self.interactive,
        )
        # pinned to the driver's node: losing a worker node must not take the tracker with it
        self.tracker = ProgressTracker.options(  # type: ignore[attr-defined]  # @ray.remote adds it
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        ).remote()
        workers, notice = workers_to_start(fit_workers(self.spec), len(schedule.queue), rows=total_rows,
                                           rows_per_shard=plan.rows_per_shard, fresh_job=not committed)
        if notice:
            log.warning("%s", notice)
        pool = [self._new_actor() for _ in range(workers)]
        log.info("loading the model on %s …", plural(len(pool), "worker"))
        try:
            while schedule.queue or any(a.inflight for a in pool):
                if self.lock is not None:
                    self.lock.check()
                pool = self._start_ready(pool)
                self._dispatch(pool)
                pool = self._collect(pool)
                live, slowest_batch, per_worker, loading_since = ray.get(self.tracker.snapshot.remote())
                self.live = live  # which shards have started: who holds a dying worker's model
                pool = self._watchdog(pool, live, slowest_batch)
                pool = self._load_watchdog(pool, loading_since)
                in_flight = sum(e[0] for e in live.values())  # generated, not committed yet
                progress.update(
                    schedule.rows_ok + in_flight, schedule.rows_failed + sum(e[1] for e in live.values()),
                    shards_committed=schedule.shards_committed, shards_failed=len(schedule.failed_shards), workers=len(pool),
                    in_flight=in_flight, per_worker=per_worker,
                )
        except BaseException as exc:  # progress.json must not go on saying "running"
            progress.close("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", schedule.failures())
            raise
        finally:
            for actor in pool:
                ray.kill(actor.handle)
        if schedule.regenerated:
            log.warning("%d shards had been committed by an earlier attempt; their results were kept", schedule.regenerated)
        progress.update(schedule.rows_ok, schedule.rows_failed, shards_committed=schedule.shards_committed,
                        shards_failed=len(schedule.failed_shards), workers=0)
        verdict = schedule.verdict()
        if verdict.state == FINISHED:
            try:
                outcome = self._finish(started, skipped, schedule.rows_ok, schedule.rows_failed, "")
            except SdbatchError:  # the commits are not the plan's: not finished, and progress.json says so
                progress.close("failed", schedule.failures())
                raise
        else:
            code = EXIT_STOPPED if verdict.state == STOPPED else EXIT_SHARDS_FAILED
            outcome = JobOutcome(code, total_rows, schedule.rows_ok, schedule.rows_failed, skipped,
                                 schedule.failed_shards, time.monotonic() - started, verdict.message, plan.batch_fill)
        progress.close(verdict.state, schedule.failures())
        shut_down_job_local_cluster()  # what follows (the report, the summary) needs no Ray
        return outcome

    # -- the actor pool: Ray mechanics; every decision is the schedule's --------------------
    def _new_actor(self) -> _Actor:
        res = self.spec.resources
        handle = WorkerActor.options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker, max_restarts=0).remote(  # type: ignore[attr-defined]
            self.spec_json, self.storage.url, self.endpoint_url, self.tracker, self.manifest,
            self.job.fingerprint, self.job.model.fingerprint, self.job.refiner.fingerprint if self.job.refiner else None,
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
                self._start_failed(WorkerStartError(f"workers keep failing to start; last error: {short_error(exc)}"))
                log.warning("a worker failed to start: %s", short_error(exc))
                fresh.append(self._replace(actor, "failed to start", culprit=None))  # nothing was handed to it
        return fresh

    def _start_failed(self, give_up: Exception) -> None:
        """Count a worker that did not start; ``give_up`` is raised once too many did."""
        self.start_failures += 1
        if self.start_failures > MAX_START_FAILURES:
            raise give_up

    def _load_watchdog(self, pool: list[_Actor], loading_since: dict[str, float]) -> list[_Actor]:
        """An actor still loading the model ``retries.load_timeout_s`` after it began (by the
        tracker's report from its constructor) is hung: replaced, counted as a start failure.
        An actor not placed yet has not begun, and is not judged."""
        timeout, now = self.spec.retries.load_timeout_s, time.time()
        fresh = []
        for actor in pool:
            began = loading_since.get(actor.handle._actor_id.hex())
            if actor.is_ready or began is None or now - began <= timeout:
                fresh.append(actor)
                continue
            self._start_failed(ModelLoadTimeout(
                f"{MAX_START_FAILURES + 1} workers failed to start, the last because it did not load the model within "
                f"retries.load_timeout_s ({timeout:g} s): it hung, or reading {self.spec.model.name!r} is that slow. Fix: look at the "
                "workers' logs (Ray's session_latest/logs), or raise retries.load_timeout_s for a large model on slow "
                "storage (--set retries.load_timeout_s=3600)"
            ))
            log.warning("a worker has been loading the model for %.0f s (retries.load_timeout_s=%g): replacing it",
                        now - began, timeout)
            fresh.append(self._replace(actor, "model load timed out", culprit=None))
        return fresh

    def _dispatch(self, pool: list[_Actor]) -> None:
        """Keep every ready actor fed with PREFETCH_DEPTH shards: only the range travels; a shard
        queued behind a running one is announced (``prefetch``) so the actor reads it meanwhile.
        Every ready actor gets its first shard before any gets a second, and none while that
        second is the last one an idle actor could have."""
        self.schedule.stop_at_deadline(time.time())
        for depth in range(1, PREFETCH_DEPTH + 1):  # a shard for every ready actor before any reads ahead
            idle = sum(not a.inflight for a in pool)  # actors with nothing yet, ready or still loading
            for actor in pool:
                while actor.is_ready and len(actor.inflight) < depth:
                    if actor.inflight and not self.schedule.may_read_ahead(idle):
                        return
                    work = self.schedule.next(time.time())
                    if work is None:
                        return
                    if actor.inflight:
                        actor.handle.prefetch.remote(work.shard, work.retry_ids)
                    work.future = actor.handle.run_shard.remote(work.shard, actor.calls, work.attempt, work.retry_ids,
                                                                not_after=self.deadline)
                    actor.calls += 1
                    actor.inflight.append(work)

    def _collect(self, pool: list[_Actor]) -> list[_Actor]:
        """Hand every call that returned to the schedule; replace actors that died."""
        futures = [w.future for a in pool for w in a.inflight]
        if not futures:  # nothing handed out yet: wake as soon as a worker has loaded the model
            loading = [a.ready for a in pool if not a.is_ready]
            if loading:
                ray.wait(loading, timeout=0.5)
            else:
                time.sleep(0.5)
            return pool
        ready = set(ray.wait(futures, num_returns=len(futures), timeout=1.0)[0])
        fresh = []
        for actor in pool:
            for work in [w for w in actor.inflight if w.future in ready]:
                try:
                    result: ShardResult = ray.get(work.future)
                except RayActorError as exc:
                    culprit = at_the_model(actor.inflight, self.live) or work  # inflight holds work: never None
                    log.warning("worker died running shard %s (attempt %d): %s", culprit.shard.name, culprit.attempt, short_error(exc))
                    actor = self._replace(actor, short_error(exc), culprit)
                    break
                except RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    if isinstance(cause, ManifestChanged):  # every shard would read it alike: the job stops
                        raise ManifestChanged(f"{cause}. The job stopped; the shards committed before are kept") from None
                    error = describe(cause)
                    log.warning("shard %s failed (attempt %d): %s", work.shard.name, work.attempt, error)
                    self._forget(actor, work)
                    if isinstance(cause, PipelineError):  # retried once, on a fresh worker
                        self.schedule.attempt_failed(work, error)
                        actor = self._replace(actor, error, culprit=None)
                        break
                    if is_transient(cause):
                        self.schedule.attempt_failed(work, error)
                    else:  # deterministic: another attempt would fail the same way
                        self.schedule.give_up(work, error)
                    continue
                except RayError as exc:  # Ray lost the task (e.g. its memory monitor killed it): transient
                    log.warning("shard %s lost (attempt %d): %s", work.shard.name, work.attempt, short_error(exc))
                    self._forget(actor, work)
                    self.schedule.attempt_failed(work, short_error(exc))
                    continue
                self._forget(actor, work)
                self.schedule.completed(work, result)
                if result.committed and not result.deferred:
                    metrics.shard_finished(result.wall_seconds)
            fresh.append(actor)
        return fresh

    def _forget(self, actor: _Actor, work: Work) -> None:
        actor.inflight.remove(work)
        self.tracker.forget.remote(work.shard.name)

    def _replace(self, actor: _Actor, error: str, culprit: Work | None) -> _Actor:
        """Kill ``actor``, tell the schedule what was handed to it (``culprit`` is charged), and
        start a fresh actor."""
        for work in actor.inflight:
            self.tracker.forget.remote(work.shard.name)
        self.schedule.worker_lost(actor.inflight, error, culprit)
        ray.kill(actor.handle)
        metrics.worker_restarted()
        return self._new_actor()

    def _watchdog(self, pool: list[_Actor], live: dict, slowest_batch: float) -> list[_Actor]:
        """A shard at a worker's model that reported no batch for the schedule's hang timeout is
        hung: its actor is replaced. (A shard past the model, storing its last images while the
        next one generates, reports nothing more and is not judged by its silence.)"""
        now = time.time()
        fresh = []
        for actor in pool:
            work = at_the_model(actor.inflight, live)
            entry = live.get(work.shard.name) if work else None
            if work is None or entry is None or not self.schedule.is_hung(entry[2], now, slowest_batch):
                fresh.append(actor)
                continue
            log.warning("shard %s made no progress for %.0f s: replacing its worker", work.shard.name, now - entry[2])
            fresh.append(self._replace(actor, f"no progress for {self.schedule.hang_timeout(slowest_batch):.0f} s", work))
        return fresh

    def _rows_work(self, committed: set[str]) -> list[Work]:
        """--retry-failed and --repair: one unit of work per committed shard holding rows to
        regenerate — failed rows, and rows whose stored image ``sdbatch verify`` flags as
        missing or not matching its recorded sha256 (the bad object is deleted first: its key
        is named by this job's own index, and create-once would not overwrite it)."""
        ids = self._failed_rows(committed) if self.retry_failed else {}
        if self.repair:
            ids = self._flagged_rows(ids)
        work = [Work(self.plan.shard(int(name)), retry_ids=frozenset(rows))
                for name, rows in sorted(ids.items(), key=lambda item: int(item[0]))]
        if work:  # the job is no longer finished until the regenerated rows are committed
            log.info("regenerating %s of %s", plural(sum(len(w.retry_ids or ()) for w in work), "row"), plural(len(work), "shard"))
            self.storage.delete(SUCCESS_KEY)
        return work

    def _failed_rows(self, committed: set[str]) -> dict[str, set[str]]:
        """The failed row ids by shard, read a record batch at a time: from ``index.parquet``
        when the job finished (one read), else from the ``committed`` shards' commits."""
        index = open_index(self.storage, self.job.fingerprint)
        if not (index.final and self.storage.exists(SUCCESS_KEY)):  # an index a retry cut short may be stale
            index = JobIndex(self.storage, self.job.fingerprint, commits=sorted(committed, key=int))
        ids: dict[str, set[str]] = {}
        for batch in index.batches(["id", "status", "shard"]):
            failed = batch.filter(pc.fill_null(pc.equal(batch.column("status"), STATUS_FAILED), False))
            for row_id, shard in zip(failed.column("id").to_pylist(), failed.column("shard").to_pylist()):
                ids.setdefault(shard, set()).add(row_id)
        return ids

    def _flagged_rows(self, ids: dict[str, set[str]]) -> dict[str, set[str]]:
        if self.spec.output.format == "webdataset":
            raise BadInput("--repair regenerates single image files; with --format webdataset a shard's images "
                           "share one tar: rerun the job with --new-run instead")
        assert self.repair is not None  # called for --repair only
        for shard, rows in self.repair(self.storage).items():
            ids.setdefault(shard, set()).update(rows)
        return ids

    def _finish(self, started: float, skipped: int, rows_ok: int, rows_failed: int, message: str) -> JobOutcome:
        """Merge the index and write ``_SUCCESS``: the merge checks that every shard of the plan
        has its commit and that they hold exactly the manifest's rows (else nothing is written)."""
        previous = Success.read(self.storage) if rows_ok == rows_failed == 0 else None
        if previous is not None:  # a finished job run again: leave its record alone
            code = EXIT_ROWS_FAILED if previous.rows_failed else EXIT_OK
            if previous.rows_failed:  # exit 3 must say why, and how to regenerate them
                message += "; " + _rows_failed_text(previous.rows_failed, previous.failed_rows)
            return JobOutcome(code, self.manifest.num_rows, 0, 0, skipped, [], time.monotonic() - started, message,
                              self.plan.batch_fill)
        if self.lock is not None:
            self.lock.check()
        log.info("merging the index of %s", plural(self.plan.num_shards, "shard"))  # a phase of its own at scale
        index = merge_index(self.storage, [shard_name(i) for i in range(self.plan.num_shards)], self.manifest.num_rows,
                            passthrough_types(self.manifest), self.job.fingerprint, DuplicateRule.of(self.spec.scoring))
        total = self.manifest.num_rows
        failed_total = index.rows_failed
        wall = time.monotonic() - started
        Success(
            rows_total=total,
            rows_in_index=index.rows,
            rows_ok=index.rows - failed_total,
            rows_failed=failed_total,
            rows_duplicate=index.duplicates,
            rows_generated_this_run=rows_ok,
            shards_skipped=skipped,
            wall_seconds_this_run=round(wall, 2),
            images_per_second_this_run=round(rows_ok / wall, 3) if wall > 0 else None,
            failed_rows=index.first_failed,
            batches=self.plan.num_batches,
            batch_size=self.plan.batch_size,
            batch_fill=round(self.plan.batch_fill, 4),
            fingerprint=self.job.fingerprint,
            finished_at=utc_now(),
            sdbatch_version=sdbatch.__version__,
        ).write(self.storage)
        code = EXIT_ROWS_FAILED if failed_total else EXIT_OK
        if failed_total:
            message = _rows_failed_text(failed_total, index.first_failed)
        return JobOutcome(code, total, rows_ok, rows_failed, skipped, [], wall, message, self.plan.batch_fill)


def _rows_failed_text(count: int, first_failed: list) -> str:
    return (f"{plural(count, 'row')} failed permanently (status=failed in index.parquet; the first ones below); "
            "fix them, then rerun with --retry-failed\n" + failed_rows_text(first_failed))


def run_job(
    spec: JobSpec, manifest: Manifest, storage: Storage, job: JobRecord, *, new_run: bool = False,
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
    except RayError as exc:  # the tracker, the raylet or the head node died under the driver
        raise JobFailed(f"the Ray cluster failed under the driver ({type(exc).__name__}: {short_error(exc)})") from None
    finally:
        lock.release()
