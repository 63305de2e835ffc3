"""The Ray actor that holds one model replica and runs the shards the driver sends it.

``WorkerActor`` only wires the Ray-free parts to Ray: ``ShardFeed`` (``feed``) reads the
worker's own rows from the manifest and the next shard ahead, ``ShardRunner`` (``shard_runner``)
runs each shard end to end; what comes back is a ``protocol.ShardResult``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from sdbatch.errors import BadInput
from sdbatch.manifest.reader import passthrough_types
from sdbatch.manifest.sources import Manifest
from sdbatch.output import encode
from sdbatch.run import metrics
from sdbatch.run.batch_fit import BatchFit
from sdbatch.run.feed import ShardFeed
from sdbatch.run.plan import ShardSpec
from sdbatch.run.protocol import ShardResult
from sdbatch.run.shard_runner import ShardRunner, encode_pool, encode_workers
from sdbatch.spec import JobSpec
from sdbatch.storage.open import open_storage

#: Shards one actor holds at once: one generating and the one after it, which starts generating
#: as soon as the model is free — while the first one's last images are stored and committed.
SHARDS_PER_ACTOR = 2


def start_encoders(workers: int) -> None:
    """Start this process's image encoders (``shard_runner.encode_pool``: spawned processes, each
    importing Python, Ray and Pillow anew) while the model is imported and loaded, so the first
    images do not wait for them after the model made them. One small task per encoder: each
    task that finds no idle encoder spawns one; the task itself imports the encoding module."""
    pool = encode_pool(workers)
    for _ in range(workers):
        pool.submit(encode.extension, "png")


@ray.remote(concurrency_groups={"prefetch": 1, "shards": SHARDS_PER_ACTOR})  # type: ignore[call-overload]  # not in ray's stubs
class WorkerActor:
    """One model replica. The driver calls ``run_shard`` with a shard's row range; the actor
    reads the rows from the manifest it was given at start (``ShardFeed``). ``prefetch``
    (its own thread) tells it which shard comes next, so its rows are read meanwhile. Two
    ``run_shard`` calls run at once and take turns at the model in the order the driver handed
    them out (``turn``): the model never waits for a shard's stores and commit, nor for the
    driver's next call."""

    def __init__(self, spec_json: str, out_url: str, endpoint_url: str | None, tracker: Any, manifest: Manifest,
                 job_fingerprint: str, model_pin: str, refiner_pin: str | None = None):
        # the driver's clock for retries.load_timeout_s starts now: a load that hangs (a stuck
        # read, a stopped process) is judged by it, since ready() never answers. Waited for, so
        # the report is delivered before anything can hang
        ray.get(tracker.loading.remote(ray.get_runtime_context().get_actor_id()))
        spec = JobSpec.model_validate_json(spec_json)
        start_encoders(encode_workers(spec.resources.cpus_per_worker))
        # a bad input found here (a model this worker cannot load, one changed since submit) is
        # found the same way by every new worker: ready() reports it, so the driver stops at once
        # with its message instead of retrying a start that cannot succeed
        self.refusal: str | None = None
        # the model is loaded, warmed up and run on this one thread (ShardRunner._on_model_thread says why)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="sdbatch-model")
        try:
            self.model_thread.submit(self._load, spec, out_url, endpoint_url, tracker, manifest, job_fingerprint,
                                     model_pin, refiner_pin).result()
        except BadInput as refusal:
            self.refusal = str(refusal)

    def _load(self, spec: JobSpec, out_url: str, endpoint_url: str | None, tracker: Any, manifest: Manifest,
              job_fingerprint: str, model_pin: str, refiner_pin: str | None) -> None:
        from sdbatch.models.loader import load
        from sdbatch.models.loading import load_request

        metrics.start(out_url)
        request = load_request(spec.model.name, pin=model_pin, refiner_pin=refiner_pin, endpoint_url=endpoint_url,
                               **spec.load_options())
        generator = load(request, torch_threads=max(1, int(spec.resources.cpus_per_worker)))
        storage = open_storage(
            out_url,
            endpoint_url=endpoint_url,
            max_attempts=spec.retries.storage_attempts,
            max_pool_connections=spec.resources.upload_threads,
        )
        scorer = None
        if spec.scoring.clip_model:
            from sdbatch.models.clip_score import ClipScorer

            scorer = ClipScorer.load(spec.scoring.clip_model, device=generator.info.device, endpoint_url=endpoint_url)
        capacity = None
        if generator.info.device == "cuda":
            from sdbatch.models.runtime import device_capacity

            capacity = device_capacity()
        batch_fit = BatchFit(spec.resources.batch_size, generator.memory_probe, capacity) if capacity else None  # type: ignore[attr-defined]  # DiffusersModel's
        self.runner = ShardRunner(generator, storage, spec, endpoint_url=endpoint_url, scorer=scorer,
                                  passthrough=passthrough_types(manifest), job_fingerprint=job_fingerprint,
                                  batch_fit=batch_fit, model_thread=self.model_thread)
        self.feed = ShardFeed(manifest, spec, endpoint_url)
        self.tracker = tracker
        self._turns = threading.Condition()
        self._turn = 0  # the turn that may use the model now

    def ready(self) -> dict[str, Any]:
        if self.refusal is not None:
            return {"refused": self.refusal}
        info = self.runner.generator.info
        return {"worker": self.runner.worker_name, "model_fingerprint": info.fingerprint, "model_pin": info.pin,
                "refiner_pin": info.refiner_pin,
                "device": info.device, "dtype": info.dtype, "versions": info.versions}

    @ray.method(concurrency_group="prefetch")
    def prefetch(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> None:
        self.feed.prefetch(shard, retry_ids)

    @ray.method(concurrency_group="shards")
    def run_shard(
        self, shard: ShardSpec, turn: int, attempt: int, retry_ids: frozenset[str] | None = None,
        not_after: float | None = None,
    ) -> ShardResult:
        """Run one shard (or, ``retry_ids``, regenerate those rows of a committed one).
        The driver hands shards ahead, so a call may wait in this actor's queue: if it only
        reaches the front at or after ``not_after`` (the job's ``--deadline``, epoch seconds)
        it is not started and comes back ``deferred``, with nothing generated or written and
        no progress reported. A shard that has started always runs to its commit. "Reaches
        the front" means: gets its turn at the model (``turn``: how many calls the driver handed
        this actor before this one)."""
        with self._turns:
            self._turns.wait_for(lambda: self._turn == turn)
        holding = [True]

        def free_model() -> None:
            with self._turns:
                if holding[0]:
                    holding[0] = False
                    self._turn += 1
                    self._turns.notify_all()

        try:
            return self._run_shard(shard, attempt, retry_ids, not_after, free_model)
        finally:
            free_model()

    def _run_shard(
        self, shard: ShardSpec, attempt: int, retry_ids: frozenset[str] | None, not_after: float | None,
        free_model: Callable[[], None],
    ) -> ShardResult:
        name = self.runner.worker_name
        if not_after is not None and time.time() >= not_after:
            self.runner.init_images.release(self.feed.drop(shard, retry_ids))  # read ahead, if it was
            return ShardResult(shard=shard.name, committed=False, worker=name, deferred=True)

        batch_started = [0.0]  # when the batch being reported began (metrics)

        def report(done: int, failed: int) -> None:
            self.tracker.report.remote(name, shard.name, done, failed)
            now = time.monotonic()
            metrics.batch_finished(now - batch_started[0], done)
            batch_started[0] = now

        self.tracker.report.remote(name, shard.name, 0, 0)  # marks the shard as started, for the watchdog
        rows = self.feed.take(shard, retry_ids)
        batch_started[0] = time.monotonic()
        return self.runner.run_shard(shard, rows, attempt, on_batch=report, upcoming=self.feed.upcoming,
                                     retry=retry_ids is not None, on_generated=free_model)
