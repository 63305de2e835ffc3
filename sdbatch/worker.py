"""Running one shard end to end, and the Ray actor that holds one model replica to do it.

``ShardRunner`` is the Ray-free core: it loads the shard's init images ahead, generates the
canonical batches on the calling thread (each batch comes back as one uint8 host array), and
hands each image to the store pool: encoding runs in processes, one per CPU of the worker
(Pillow's encoders hold the GIL: ``benchmarks/bench_png_gil.py``), hashing and the create-once
writes on threads, so the model never waits for encoding or a PUT while the bounded queue has
room. A batch that runs out of GPU memory is generated again in halves (each half is then its
own batch, in ``batch_rows``); a row whose image came out NaN or black fails with that error.
When every image is stored it writes the shard index — the commit. ``ShardFeed`` (Ray-free
too) reads the worker's own rows from the manifest and reads the next shard ahead.
``WorkerActor`` only wires them to Ray.

Failure classes (DESIGN §4): a problem of one row (its init image, its metadata) fails that
row with an error naming the exception, the row and the fix; an exception the pipeline
raises for a batch is retried once, on a fresh worker (``PipelineError``), and then fails that
batch's rows; transient failures (storage outages, CUDA out of memory) propagate so the
driver re-queues the shard; the other rows of the shard commit in every case.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
from PIL import Image

import sdbatch
from sdbatch import encode, metrics
from sdbatch.columns import record_parameters
from sdbatch.errors import SdbatchError
from sdbatch.manifest import INDEX_RESULT_COLUMNS, Manifest, ManifestReader, Row, passthrough_types
from sdbatch.output import (
    STATUS_FAILED,
    STATUS_OK,
    build_webdataset_tar,
    commit_shard,
    foreign_object_error,
    image_key,
    index_schema,
    metadata_key,
    read_commit,
    read_shard_index,
    tar_key,
    webdataset_key,
)
from sdbatch.plan import ShardSpec, batch_id, canonical_batches
from sdbatch.policy import ShardResult
from sdbatch.quality import measure_image
from sdbatch.spec import JobSpec
from sdbatch.storage import NotFound, Storage, StorageConfigError, StorageError, TooLarge, open_storage, read_uri

if TYPE_CHECKING:  # the driver imports this module; only the actor needs torch
    import numpy as np

    from sdbatch.clip_score import ClipScorer
    from sdbatch.generate import Generator
    from sdbatch.models import GeneratedBatch

log = logging.getLogger("sdbatch.worker")

BatchCallback = Callable[[int, int], None]  # (rows done, rows failed) since the last call
InitImages = dict[str, Future]  # row id -> future of (image, sha256 of its bytes), or RowError


class PipelineError(SdbatchError):
    """The pipeline raised for one batch on a first attempt: the driver retries the shard on
    a fresh worker, and a second failure fails that batch's rows only."""


class RowError(Exception):
    """One row cannot be generated (its init image, its metadata); the message says why and how to fix it."""


def is_transient(exc: BaseException) -> bool:
    """Worth re-queueing: a storage outage, or the GPU out of memory (torch's
    ``OutOfMemoryError``, named so this module needs no torch)."""
    return (isinstance(exc, StorageError) and exc.transient) or type(exc).__name__ == "OutOfMemoryError"


def describe(exc: BaseException) -> str:
    """``Class: message`` — never a bare message (``scipy```) nor an object repr."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class StoredImage:
    key: str  # "" for a webdataset member (stored with its shard's tar)
    sha256: str  # of this row's bytes
    size: int
    created: bool
    quality: dict[str, Any]  # the quality columns (sdbatch.quality), measured on the pixels
    data: bytes = b""  # webdataset: the bytes, for the tar
    error: str | None = None  # the key holds an object that is not these bytes: not adopted


def image_record(
    row: Row,
    shard: ShardSpec,
    batch: str,
    batch_rows: list[str],
    generator: Generator,
    init_image_sha256: str | None = None,
) -> dict[str, Any]:
    """Everything needed to regenerate the image, embedded in it. Nothing that varies between
    attempts (times, worker, attempt number) or with other rows of the job goes in, so the
    bytes are reproducible and a row's image depends on that row (and its batch) alone.
    ``init_image_sha256`` (img2img rows) is the sha256 of the init image's bytes as read, so
    an audit can tell when the file at ``init_image`` was replaced afterwards."""
    info = generator.info
    conditioning = generator.conditioning(row)
    return {
        **record_parameters(row.parameters()),
        "loras": generator.loras.record(row.loras),
        "prompt_truncated_at": generator.prompt_truncated_at(row.prompt),
        **({"size_conditioning": {k: list(v) for k, v in conditioning.items()}} if conditioning else {}),
        **generator.refiner_record(row),
        "init_image_sha256": init_image_sha256,
        "shard": shard.name,
        "batch_id": batch,
        "batch_rows": batch_rows,
        "scheduler_config": generator.scheduler_config(row.scheduler),
        "extra": row.extra,
        "model_name": info.name,
        "model_family": info.family,
        "model_fingerprint": info.fingerprint,
        "model_hash": info.short_hash,
        "device": info.device,
        "dtype": info.dtype,
        "versions": info.versions,
        "torch_threads": info.threads,
        "sdbatch_version": sdbatch.__version__,
    }


def index_row(record: dict[str, Any] | None, row: Row, shard_name: str, **fields: Any) -> dict[str, Any]:
    """One row of the shard index: the row's parameters, the result and passthrough columns.
    Every row has every column (None where it does not apply), so ok and failed rows share
    one schema whichever comes first."""
    base: dict[str, Any] = {
        **row.parameters(),
        **dict.fromkeys(INDEX_RESULT_COLUMNS),
        "shard": shard_name,
    }
    if record is not None:
        base.update(
            batch_id=record["batch_id"],
            batch_rows=record["batch_rows"],
            model_fingerprint=record["model_fingerprint"],
            refiner_fingerprint=record.get("refiner_fingerprint"),
            device=record["device"],
            dtype=record["dtype"],
            torch_threads=record["torch_threads"],
            versions=json.dumps(record["versions"], sort_keys=True),
            init_image_sha256=record.get("init_image_sha256"),
            loras=record["loras"],
            prompt_truncated_at=record["prompt_truncated_at"],
        )
    base.update(fields)
    base.update(row.extra)
    return base


@functools.cache
def encode_pool(workers: int) -> ProcessPoolExecutor:
    """The processes that encode images, shared by every ShardRunner of this process. Spawned,
    not forked: a worker process runs threads (Ray's, the store pool's) that a fork would copy
    mid-flight. Shut down at exit before multiprocessing's own atexit hook joins its children:
    ``cli.main`` (and the test session) run the atexit handlers before threading's shutdown,
    which would otherwise leave the idle encoders waiting for work and the join hanging."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    atexit.register(pool.shutdown, wait=True, cancel_futures=True)
    return pool


def encode_workers(cpus_per_worker: float) -> int:
    return max(1, int(cpus_per_worker))


class ShardRunner:
    def __init__(
        self,
        generator: Generator,
        storage: Storage,
        spec: JobSpec,
        worker_name: str = "",
        endpoint_url: str | None = None,
        scorer: ClipScorer | None = None,
        passthrough: dict[str, pa.DataType] | None = None,
        *,
        job_fingerprint: str,
    ):
        """``passthrough``: the manifest's passthrough columns and their types
        (``manifest.passthrough_types``), the last columns of every shard index written."""
        self.generator = generator
        self.scorer = scorer
        self.job_fingerprint = job_fingerprint  # stamped on every commit this runner writes
        self.index_schema = index_schema(passthrough or {})
        self.storage = storage
        self.spec = spec
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.endpoint_url = endpoint_url
        encoders = encode_workers(spec.resources.cpus_per_worker)
        self.encoder = encode_pool(encoders)
        # each store thread waits for its image's encoding, then hashes and writes it
        threads = spec.resources.upload_threads + encoders
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sdbatch-io")
        # bounds generated-but-unwritten images held in memory
        self._in_flight = threading.BoundedSemaphore(threads * 2)

    def load_init_images(self, rows: list[Row]) -> InitImages:
        """Start reading each img2img row's init image; each future gives (image, sha256 hex
        of the bytes read) or raises RowError (or a transient StorageError)."""
        return {r.id: self.pool.submit(self._load_init_image, r) for r in rows if r.is_img2img}

    def _load_init_image(self, row: Row) -> tuple[Image.Image, str]:
        limits = self.spec.limits
        where = f"row {row.id}: init_image {row.init_image!r}"
        try:
            data = read_uri(row.init_image, endpoint_url=self.endpoint_url, max_bytes=limits.max_init_image_bytes)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                pixels = image.width * image.height
                if pixels > limits.max_pixels:
                    raise RowError(
                        f"{where} is {image.width}x{image.height} = {pixels:,} pixels, over limits.max_pixels "
                        f"({limits.max_pixels:,}); fix: downscale it, or raise limits.max_pixels"
                    )
                image.load()
                return image.copy(), hashlib.sha256(data).hexdigest()
        except StorageError as exc:
            if exc.transient:
                raise  # a storage outage is not the row's fault: retry the shard
            raise RowError(f"{where}: {describe(exc)}; fix: {_init_image_fix(exc)}") from None
        except Image.UnidentifiedImageError:  # its message is the repr of our BytesIO: say it plainly
            raise RowError(f"{where}: UnidentifiedImageError: cannot identify the image format of its "
                           f"{len(data):,} bytes; fix: replace it with a PNG, JPEG or WebP file") from None
        except Image.DecompressionBombError as exc:
            raise RowError(f"{where}: {describe(exc)}; fix: downscale the image (it decodes to too many pixels)") from None
        except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for unreadable or truncated images
            raise RowError(f"{where}: {describe(exc)}; fix: replace it with a readable PNG, JPEG or WebP file") from None

    def _store_image(self, shard: ShardSpec, row: Row, pixels: np.ndarray, record: dict) -> StoredImage:
        """Encode and store create-once; also measures its quality columns while its pixels are
        here. A key already taken is adopted only when it holds exactly these bytes (a dead
        attempt of this row made them); anything else is not ours."""
        try:
            quality = measure_image(Image.fromarray(pixels), self.spec.scoring.blank_max_std)
            out = self.spec.output
            data = self.encoder.submit(
                encode.encode_image, pixels, record,
                fmt=out.image_format, png_compress_level=out.png_compress_level, quality=out.quality,
            ).result()
            sha = hashlib.sha256(data).hexdigest()
            if out.format == "webdataset":
                return StoredImage("", sha, len(data), True, quality, data)
            key = image_key(shard.name, row.id, encode.extension(out.image_format))
            put = self.storage.put_new(key, data)
            error = None if put.created or put.sha256 == sha else foreign_object_error(key, put.sha256, sha)
            return StoredImage(key, sha, len(data), put.created, quality, error=error)
        finally:
            self._in_flight.release()

    def run_shard(
        self, shard: ShardSpec, rows: list[Row], attempt: int = 1, on_batch: BatchCallback | None = None,
        init_images: InitImages | None = None, *, retry: bool = False,
    ) -> ShardResult:
        """Generate, store and commit ``rows``: a whole shard (skipped if an earlier attempt
        committed it), or (``retry``, --retry-failed) some rows of a committed shard, whose
        commit is then replaced by one with their new entries in place of the old, every
        other entry kept as it was. ``init_images``: what ``load_init_images(rows)`` started
        earlier (prefetch), if it did."""
        started = time.perf_counter()
        result = ShardResult(shard=shard.name, worker=self.worker_name)
        previous = read_commit(self.storage, shard.name, self.job_fingerprint) if retry else None
        if previous is None and self.storage.exists(metadata_key(shard.name)):
            read_shard_index(self.storage, shard.name, self.job_fingerprint)  # ForeignCommit if not ours
            result.committed = False
            return result
        unit = shard.name
        if previous is not None:  # its own tar (webdataset) and batch ids, named by the rows retried
            unit = f"{shard.name}-retry-{hashlib.sha256(json.dumps(sorted(r.id for r in rows)).encode()).hexdigest()[:8]}"
        index_rows = self._generate(shard, rows, attempt, on_batch, result, unit, init_images)
        if previous is not None:
            fresh = {r["id"]: r for r in index_rows}
            index_rows = [fresh.get(r["id"], r) for r in previous.records]
        result.committed = commit_shard(self.storage, shard.name, index_rows, self.index_schema, self.job_fingerprint,
                                        replacing=previous)
        result.wall_seconds = time.perf_counter() - started
        return result

    def _generate(
        self, shard: ShardSpec, rows: list[Row], attempt: int, on_batch: BatchCallback | None,
        result: ShardResult, tar_name: str, init_images: InitImages | None,
    ) -> list[dict[str, Any]]:
        """Generate and store ``rows``' images in canonical batches; returns their index rows."""
        if init_images is None:
            init_images = self.load_init_images(rows)
        index_rows: list[dict[str, Any]] = []
        stored: list[tuple[Row, dict, Future, float | None]] = []

        def fail_row(row: Row, error: str) -> None:
            index_rows.append(index_row(None, row, shard.name, status=STATUS_FAILED, error=error, attempt=attempt, worker=self.worker_name))
            result.rows_failed += 1

        generate_started = time.perf_counter()
        for number, batch in enumerate(canonical_batches(rows, self.spec.resources.batch_size)):
            failed_before = result.rows_failed
            good, images_in, init_hashes = [], [], {}
            for row in batch:
                try:
                    image_in, init_hashes[row.id] = init_images[row.id].result() if row.is_img2img else (None, None)
                except RowError as exc:
                    fail_row(row, str(exc))
                    continue
                good.append(row)
                images_in.append(image_in)
            if good:
                bid = batch_id(tar_name, number)
                handled: set[str] = set()  # rows of the parts generated before a pipeline exception
                try:
                    for part, generated, per_row in self._generate_fitting(good, images_in if good[0].is_img2img else None):
                        batch_rows = [r.id for r in part]
                        scores = (self.scorer.score([r.prompt for r in part], generated.images()) if self.scorer
                                  else [None] * len(part))
                        for i, (row, score) in enumerate(zip(part, scores)):
                            if generated.errors[i]:
                                index_rows.append(index_row(None, row, shard.name, status=STATUS_FAILED, error=generated.errors[i], attempt=attempt, worker=self.worker_name))
                                result.rows_failed += 1
                                continue
                            record = image_record(row, shard, bid, batch_rows, self.generator, init_hashes[row.id])
                            self._in_flight.acquire()
                            future = self.pool.submit(self._store_image, shard, row, generated.pixels[i], record)
                            stored.append((row, {**record, "generate_seconds": per_row}, future, score))
                        handled.update(r.id for r in part)
                except Exception as exc:  # noqa: BLE001 - any pipeline exception: retried once, then its rows fail
                    if is_transient(exc):
                        raise
                    if attempt < min(2, self.spec.retries.shard_attempts):
                        raise PipelineError(f"the pipeline raised for batch {bid} of shard {shard.name}: {describe(exc)}") from exc
                    retried = "after a retry on a fresh worker" if attempt > 1 else "not retried: retries.shard_attempts=1"
                    for row in good:
                        if row.id not in handled:
                            fail_row(row, f"row {row.id}: the pipeline raised {describe(exc)} for batch {bid} ({retried}); "
                                          "fix: check this row's parameters and the model, then rerun with --retry-failed")
            if on_batch:
                failed = result.rows_failed - failed_before
                on_batch(len(batch) - failed, failed)
        result.generate_seconds = time.perf_counter() - generate_started

        webdataset = self.spec.output.format == "webdataset"
        ext = encode.extension(self.spec.output.image_format)
        done: list[tuple[Row, dict, StoredImage, float | None]] = []
        for row, record, future, score in stored:
            try:
                done.append((row, record, future.result(), score))  # re-raises storage errors → shard retried
            except encode.MetadataTooLarge as exc:
                fail_row(row, f"row {row.id}: {describe(exc)}; fix: shorten its prompt or passthrough columns, "
                              "or use --image-format png")
        tar_error = None
        if webdataset and done:
            members = [
                (webdataset_key(row.id), put.data,
                 json.dumps({k: v for k, v in record.items() if k != "generate_seconds"}, sort_keys=True).encode())
                for row, record, put, _ in done
            ]
            tar = build_webdataset_tar(members, ext)
            put = self.storage.put_new(tar_key(tar_name), tar)
            ours = hashlib.sha256(tar).hexdigest()
            if not put.created and put.sha256 != ours:
                tar_error = foreign_object_error(tar_key(tar_name), put.sha256, ours)
        for row, record, put, score in done:
            key = f"{tar_key(tar_name)}#{webdataset_key(row.id)}.{ext}" if webdataset else put.key
            error = tar_error or put.error
            if error:
                log.error("row %s: %s", row.id, error)
                index_rows.append(index_row(record, row, shard.name, status=STATUS_FAILED, error=error, key=key,
                                            attempt=attempt, worker=self.worker_name))
                result.rows_failed += 1
                continue
            result.images_created += put.created
            result.images_adopted += not put.created
            index_rows.append(
                index_row(
                    record, row, shard.name, status=STATUS_OK, error=None, key=key, sha256=put.sha256, bytes=put.size,
                    attempt=attempt, worker=self.worker_name, generate_seconds=record["generate_seconds"],
                    clip_score=score, **put.quality,
                )
            )
            result.rows_ok += 1
            result.prompts_truncated += record["prompt_truncated_at"] is not None
        index_rows.sort(key=lambda r: r["row"])
        return index_rows

    def _generate_fitting(
        self, rows: list[Row], init_images: list | None
    ) -> list[tuple[list[Row], GeneratedBatch, float]]:
        """Generate ``rows`` as one batch or, when the device runs out of memory, as halves
        (recursively; one row that does not fit fails the shard). Returns (rows, their batch,
        seconds per row) for each part generated."""
        from sdbatch.generate import OUT_OF_MEMORY_ERRORS, free_device_memory

        t0 = time.perf_counter()
        try:
            generated = self.generator.generate(rows, init_images)
        except OUT_OF_MEMORY_ERRORS:
            if len(rows) == 1:
                raise
            free_device_memory()
            half = (len(rows) + 1) // 2
            log.warning("a batch of %d rows ran out of device memory: generating it as %d + %d rows",
                        len(rows), half, len(rows) - half)
            halves = [(rows[:half], init_images and init_images[:half]), (rows[half:], init_images and init_images[half:])]
            return [part for sub, images in halves for part in self._generate_fitting(sub, images)]
        return [(rows, generated, (time.perf_counter() - t0) / len(rows))]


def _init_image_fix(exc: StorageError) -> str:
    if isinstance(exc, TooLarge):
        return "shrink the file, or raise limits.max_init_image_bytes"
    if isinstance(exc, NotFound):
        return "correct the path (absolute, or relative to the manifest), or clear init_image for this row"
    if isinstance(exc, StorageConfigError):
        return "make the file readable by the workers"
    return "point init_image at a regular image file"


class ShardFeed:
    """A worker's rows: it keeps the job's manifest open and reads each shard's rows itself
    (the driver sends only the row range), and reads the next shard's rows and starts loading
    its init images while the current one generates — at most one shard ahead. All reads run
    on one thread (the manifest reader is not thread-safe)."""

    def __init__(
        self, manifest: Manifest, spec: JobSpec, load_init_images: Callable[[list[Row]], InitImages],
        endpoint_url: str | None = None,
    ):
        self.reader = ManifestReader(manifest, endpoint_url)
        self.spec = spec
        self.load_init_images = load_init_images
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="sdbatch-rows")
        self._ahead: dict[tuple[str, frozenset[str] | None], Future] = {}
        self._taken: tuple[str, frozenset[str] | None] | None = None  # the shard running (or last run)
        self._lock = threading.Lock()

    def _read(self, shard: ShardSpec, retry_ids: frozenset[str] | None) -> tuple[list[Row], InitImages]:
        rows = self.reader.read_rows_at(self.spec, shard.rows)
        if retry_ids is not None:
            rows = [r for r in rows if r.id in retry_ids]
        return rows, self.load_init_images(rows)

    def prefetch(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> None:
        """Start reading ``shard`` ahead, unless a shard is already read ahead (or this one has
        already started: the two calls run on different threads)."""
        with self._lock:
            if not self._ahead and self._taken != (shard.name, retry_ids):
                self._ahead[(shard.name, retry_ids)] = self._reads.submit(self._read, shard, retry_ids)

    def take(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> tuple[list[Row], InitImages]:
        """``shard``'s rows and the futures of its init images: read ahead, or read now."""
        with self._lock:
            self._taken = (shard.name, retry_ids)
            future = self._ahead.pop(self._taken, None) or self._reads.submit(self._read, shard, retry_ids)
        return future.result()

    def drop(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> None:
        """Forget ``shard``'s read-ahead (it will not run here)."""
        with self._lock:
            future = self._ahead.pop((shard.name, retry_ids), None)
        if future is not None:
            future.cancel()


@ray.remote(concurrency_groups={"prefetch": 1})
class WorkerActor:
    """One model replica. The driver calls ``run_shard`` with a shard's row range; the actor
    reads the rows from the manifest it was given at start (``ShardFeed``). ``prefetch``
    (its own thread) tells it which shard comes next, so its rows are read meanwhile."""

    def __init__(self, spec_json: str, out_url: str, endpoint_url: str | None, tracker: Any, manifest: Manifest,
                 job_fingerprint: str, model_pin: str, refiner_pin: str | None = None):
        import torch

        from sdbatch.generate import Generator

        spec = JobSpec.model_validate_json(spec_json)
        metrics.start(out_url)
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
        generator = Generator.load(
            spec.model.name, pin=model_pin, device=spec.model.device, dtype=spec.model.dtype,
            endpoint_url=endpoint_url, loras=spec.loras, compile=spec.model.compile,
            refiner=spec.model.refiner, refiner_pin=refiner_pin,
        )
        storage = open_storage(
            out_url,
            endpoint_url=endpoint_url,
            max_attempts=spec.retries.storage_attempts,
            max_pool_connections=spec.resources.upload_threads,
        )
        scorer = None
        if spec.scoring.clip_model:
            from sdbatch.clip_score import ClipScorer

            scorer = ClipScorer.load(spec.scoring.clip_model, device=generator.info.device, endpoint_url=endpoint_url)
        self.runner = ShardRunner(generator, storage, spec, endpoint_url=endpoint_url, scorer=scorer,
                                  passthrough=passthrough_types(manifest), job_fingerprint=job_fingerprint)
        self.feed = ShardFeed(manifest, spec, self.runner.load_init_images, endpoint_url)
        self.tracker = tracker

    def ready(self) -> dict[str, Any]:
        info = self.runner.generator.info
        return {"worker": self.runner.worker_name, "model_fingerprint": info.fingerprint, "model_pin": info.pin,
                "refiner_pin": info.refiner_pin,
                "device": info.device, "dtype": info.dtype, "versions": info.versions}

    @ray.method(concurrency_group="prefetch")
    def prefetch(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> None:
        self.feed.prefetch(shard, retry_ids)

    def run_shard(
        self, shard: ShardSpec, attempt: int, retry_ids: frozenset[str] | None = None,
        not_after: float | None = None,
    ) -> ShardResult:
        """Run one shard (or, ``retry_ids``, regenerate those rows of a committed one).
        The driver hands shards ahead, so a call may wait in this actor's queue: if it only
        reaches the front at or after ``not_after`` (the job's ``--deadline``, epoch seconds)
        it is not started and comes back ``deferred``, with nothing generated or written and
        no progress reported. A shard that has started always runs to its commit."""
        name = self.runner.worker_name
        if not_after is not None and time.time() >= not_after:
            self.feed.drop(shard, retry_ids)
            return ShardResult(shard=shard.name, committed=False, worker=name, deferred=True)

        batch_started = [0.0]  # when the batch being reported began (metrics)

        def report(done: int, failed: int) -> None:
            self.tracker.report.remote(name, shard.name, done, failed)
            now = time.monotonic()
            metrics.batch_finished(now - batch_started[0], done)
            batch_started[0] = now

        self.tracker.report.remote(name, shard.name, 0, 0)  # marks the shard as started, for the watchdog
        rows, init_images = self.feed.take(shard, retry_ids)
        batch_started[0] = time.monotonic()
        return self.runner.run_shard(shard, rows, attempt, on_batch=report, init_images=init_images,
                                     retry=retry_ids is not None)
