"""Running one shard end to end, and the Ray actor that holds one model replica to do it.

``ShardRunner`` is the Ray-free core: it reads each batch's init images while the batch
before it generates (``InitImageLoader``: at most ``resources.init_images_in_memory`` decoded
at once, never a whole shard), generates the canonical batches on the calling thread (each batch comes back as one uint8 host array), and
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

from sdbatch import encode, metrics
from sdbatch.errors import SdbatchError
from sdbatch.manifest import Manifest, ManifestReader, passthrough_types
from sdbatch.data.row import Row
from sdbatch.layout import ShardWriter, layout_for
from sdbatch.data.index import STATUS_FAILED, STATUS_OK, index_schema
from sdbatch.output import commit_shard, metadata_key, read_commit, read_shard_index
from sdbatch.plan import ShardSpec, batch_id, canonical_batches
from sdbatch.policy import ShardResult
from sdbatch.quality import measure_image
from sdbatch.data.record import ImageRecord, index_row
from sdbatch.spec import JobSpec
from sdbatch.storage.base import NotFound, Storage, StorageConfigError, StorageError, TooLarge
from sdbatch.storage.open import open_storage, read_uri

if TYPE_CHECKING:  # the driver imports this module; only the actor needs torch
    import numpy as np

    from sdbatch.models.clip_score import ClipScorer
    from sdbatch.models.runtime import Generator
    from sdbatch.models.adapter import GeneratedBatch

log = logging.getLogger("sdbatch.worker")

BatchCallback = Callable[[int, int], None]  # (rows done, rows failed) since the last call


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
    sha256: str  # of this row's bytes
    size: int
    quality: dict[str, Any]  # the quality columns (sdbatch.quality), measured on the pixels


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
        self.layout = layout_for(storage, spec.output)
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
        self.init_images = InitImageLoader(self._load_init_image, self.pool, spec.resources.init_image_limit,
                                           spec.resources.batch_size)

    def _load_init_image(self, row: Row) -> tuple[Image.Image, str]:
        """(image, sha256 hex of the bytes read), or RowError (or a transient StorageError)."""
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

    def _store_image(self, writer: ShardWriter, row: Row, pixels: np.ndarray, record: ImageRecord) -> StoredImage:
        """Encode ``row``'s image and hand it to the layout's writer (create-once for files);
        also measures its quality columns while its pixels are here."""
        try:
            quality = measure_image(Image.fromarray(pixels), self.spec.scoring.blank_max_std)
            out = self.spec.output
            embedded = record.to_embedded()
            data = self.encoder.submit(
                encode.encode_image, pixels, embedded,
                fmt=out.image_format, png_compress_level=out.png_compress_level, quality=out.quality,
            ).result()
            sha = hashlib.sha256(data).hexdigest()
            writer.add(row.id, data, sha, embedded)
            return StoredImage(sha, len(data), quality)
        finally:
            self._in_flight.release()

    def run_shard(
        self, shard: ShardSpec, rows: list[Row], attempt: int = 1, on_batch: BatchCallback | None = None,
        upcoming: Callable[[], list[Row] | None] | None = None, *, retry: bool = False,
        on_generated: Callable[[], None] | None = None,
    ) -> ShardResult:
        """Generate, store and commit ``rows``: a whole shard (skipped if an earlier attempt
        committed it), or (``retry``, --retry-failed) some rows of a committed shard, whose
        commit is then replaced by one with their new entries in place of the old, every
        other entry kept as it was. ``upcoming``: the rows of the shard this worker runs next,
        if already read (``ShardFeed.upcoming``): its first batch's init images are read while
        this shard's last batch generates. ``on_generated`` is called once the model has made the
        last image (stores and the commit may still be running)."""
        try:
            return self._run_shard(shard, rows, attempt, on_batch, upcoming, retry, on_generated)
        finally:  # whatever happened, none of its init images stays held (some may have been read ahead)
            self.init_images.release(rows)

    def _run_shard(
        self, shard: ShardSpec, rows: list[Row], attempt: int, on_batch: BatchCallback | None,
        upcoming: Callable[[], list[Row] | None] | None, retry: bool, on_generated: Callable[[], None] | None,
    ) -> ShardResult:
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
        index_rows = self._generate(shard, rows, attempt, on_batch, result, unit, upcoming, on_generated)
        if previous is not None:
            fresh = {r["id"]: r for r in index_rows}
            index_rows = [fresh.get(r["id"], r) for r in previous.records]
        result.committed = commit_shard(self.storage, shard.name, index_rows, self.index_schema, self.job_fingerprint,
                                        replacing=previous)
        result.wall_seconds = time.perf_counter() - started
        return result

    def _generate(
        self, shard: ShardSpec, rows: list[Row], attempt: int, on_batch: BatchCallback | None,
        result: ShardResult, unit: str, upcoming: Callable[[], list[Row] | None] | None,
        on_generated: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Generate and store ``rows``' images in canonical batches; returns their index rows.
        ``unit`` names this run's batches (and its tar, webdataset). Each batch's init images
        are read while the batch before it generates."""
        writer = self.layout.writer(shard.name, unit)
        index_rows: list[dict[str, Any]] = []
        stored: list[tuple[Row, ImageRecord, float, Future, float | None]] = []

        def fail_row(row: Row, error: str) -> None:
            index_rows.append(index_row(row, shard.name, status=STATUS_FAILED, error=error, attempt=attempt, worker=self.worker_name))
            result.rows_failed += 1

        generate_started = time.perf_counter()
        batches = canonical_batches(rows, self.spec.resources.batch_size)
        for number, batch in enumerate(batches):
            failed_before = result.rows_failed
            loading = self.init_images.take(batch)
            if number + 1 < len(batches):
                self.init_images.ahead(batches[number + 1])
            elif upcoming and (next_rows := upcoming()):  # the next shard's first batch
                self.init_images.ahead(canonical_batches(next_rows, self.spec.resources.batch_size)[0])
            good, images_in, init_hashes = [], [], {}
            for row in batch:
                try:
                    image_in, init_hashes[row.id] = loading[row.id].result() if row.is_img2img else (None, None)
                except RowError as exc:
                    fail_row(row, str(exc))
                    continue
                good.append(row)
                images_in.append(image_in)
            if good:
                bid = batch_id(unit, number)
                handled: set[str] = set()  # rows of the parts generated before a pipeline exception
                try:
                    for part, generated, per_row in self._generate_fitting(good, images_in if good[0].is_img2img else None):
                        batch_rows = [r.id for r in part]
                        scores = (self.scorer.score([r.prompt for r in part], generated.images()) if self.scorer
                                  else [None] * len(part))
                        for i, (row, score) in enumerate(zip(part, scores)):
                            if generated.errors[i]:
                                index_rows.append(index_row(row, shard.name, status=STATUS_FAILED, error=generated.errors[i], attempt=attempt, worker=self.worker_name))
                                result.rows_failed += 1
                                continue
                            record = ImageRecord.from_row(row, shard, bid, batch_rows, self.generator, init_hashes[row.id])
                            self._in_flight.acquire()
                            future = self.pool.submit(self._store_image, writer, row, generated.pixels[i], record)
                            stored.append((row, record, per_row, future, score))
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
            self.init_images.release(batch)
            del loading, images_in  # the decoded images go with the last references to them
            if on_batch:
                failed = result.rows_failed - failed_before
                on_batch(len(batch) - failed, failed)
        result.generate_seconds = time.perf_counter() - generate_started
        if on_generated:
            on_generated()

        done: list[tuple[Row, ImageRecord, float, StoredImage, float | None]] = []
        for row, record, seconds, future, score in stored:
            try:
                done.append((row, record, seconds, future.result(), score))  # re-raises storage errors → shard retried
            except encode.MetadataTooLarge as exc:
                fail_row(row, f"row {row.id}: {describe(exc)}; fix: shorten its prompt or passthrough columns, "
                              "or use --image-format png")
        placed = writer.finish([row.id for row, *_ in done])
        for row, record, seconds, image, score in done:
            where = placed[row.id]
            if where.error:
                log.error("row %s: %s", row.id, where.error)
                index_rows.append(record.to_index_row(status=STATUS_FAILED, error=where.error, key=where.key,
                                                      attempt=attempt, worker=self.worker_name))
                result.rows_failed += 1
                continue
            result.images_created += where.created
            result.images_adopted += not where.created
            index_rows.append(
                record.to_index_row(
                    status=STATUS_OK, error=None, key=where.key, sha256=image.sha256,
                    bytes=image.size, attempt=attempt, worker=self.worker_name, generate_seconds=seconds,
                    clip_score=score, **image.quality,
                )
            )
            result.rows_ok += 1
            result.prompts_truncated += record.prompt_truncated_at is not None
        index_rows.sort(key=lambda r: r["row"])
        return index_rows

    def _generate_fitting(
        self, rows: list[Row], init_images: list | None
    ) -> list[tuple[list[Row], GeneratedBatch, float]]:
        """Generate ``rows`` as one batch or, when the device runs out of memory, as halves
        (recursively; one row that does not fit fails the shard). Returns (rows, their batch,
        seconds per row) for each part generated."""
        from sdbatch.models.runtime import OUT_OF_MEMORY_ERRORS, free_device_memory

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


class InitImageLoader:
    """A worker's init images, read and decoded on the store pool a batch ahead of the batch
    that uses them, at most ``limit`` held at once (counted from the start of a read until the
    batch is generated, or its shard ends). ``take`` starts whatever of a batch is not started
    yet, room or not (the batch must run); ``ahead`` starts a later batch only within
    ``limit - batch_size``, so that the next ``take`` always fits under ``limit``."""

    def __init__(self, load: Callable[[Row], tuple[Image.Image, str]], pool: ThreadPoolExecutor, limit: int,
                 batch_size: int):
        self._load = load
        self._pool = pool
        self.limit = limit
        self.ahead_limit = limit - batch_size
        self._held: dict[str, Future] = {}  # row id -> future of (image, sha256), or RowError
        self._ahead: set[str] = set()  # the held ones started by ``ahead``, not taken yet
        self._lock = threading.Lock()  # ``ahead`` also runs on the feed's thread

    @property
    def held(self) -> int:
        return len(self._held)

    def ahead(self, rows: list[Row]) -> bool:
        """Start reading ``rows``' init images if all of them fit; False if they wait for ``take``."""
        with self._lock:
            new = [r for r in rows if r.is_img2img and r.id not in self._held]
            if len(self._ahead) + len(new) > self.ahead_limit or len(self._held) + len(new) > self.limit:
                return False
            for row in new:
                self._held[row.id] = self._pool.submit(self._load, row)
                self._ahead.add(row.id)
            return True

    def take(self, rows: list[Row]) -> dict[str, Future]:
        """The futures of one batch's init images, reads started now where ``ahead`` did not."""
        with self._lock:
            for row in rows:
                if row.is_img2img and row.id not in self._held:
                    self._held[row.id] = self._pool.submit(self._load, row)
                self._ahead.discard(row.id)
            return {r.id: self._held[r.id] for r in rows if r.is_img2img}

    def release(self, rows: list[Row]) -> None:
        """Forget ``rows``' images (generated, or their shard will not run here)."""
        with self._lock:
            for row in rows:
                future = self._held.pop(row.id, None)
                self._ahead.discard(row.id)
                if future is not None:
                    future.cancel()


class ShardFeed:
    """A worker's rows: it keeps the job's manifest open and reads each shard's rows itself
    (the driver sends only the row range), and reads the next shard's rows while the current
    one generates — at most one shard ahead (the runner reads the init images of that shard's
    first batch during its own last batch: ``upcoming``). All reads run on one thread (the
    manifest reader is not thread-safe)."""

    def __init__(self, manifest: Manifest, spec: JobSpec, endpoint_url: str | None = None):
        self.reader = ManifestReader(manifest, endpoint_url)
        self.spec = spec
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="sdbatch-rows")
        self._ahead: dict[tuple[str, frozenset[str] | None], Future] = {}
        self._taken: tuple[str, frozenset[str] | None] | None = None  # the shard running (or last run)
        self._lock = threading.Lock()

    def _read(self, shard: ShardSpec, retry_ids: frozenset[str] | None) -> list[Row]:
        rows = self.reader.read_rows_at(self.spec, shard.rows)
        if retry_ids is not None:
            rows = [r for r in rows if r.id in retry_ids]
        return rows

    def prefetch(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> None:
        """Start reading ``shard`` ahead, unless a shard is already read ahead (or this one has
        already started: the two calls run on different threads)."""
        with self._lock:
            if not self._ahead and self._taken != (shard.name, retry_ids):
                self._ahead[(shard.name, retry_ids)] = self._reads.submit(self._read, shard, retry_ids)

    def take(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> list[Row]:
        """``shard``'s rows: read ahead, or read now."""
        with self._lock:
            self._taken = (shard.name, retry_ids)
            future = self._ahead.pop(self._taken, None) or self._reads.submit(self._read, shard, retry_ids)
        return future.result()

    def upcoming(self) -> list[Row] | None:
        """The rows of the shard read ahead, if their read has finished (never waits)."""
        with self._lock:
            future = next(iter(self._ahead.values()), None)
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None  # a failed read fails that shard when it runs, not this one
        return future.result()

    def drop(self, shard: ShardSpec, retry_ids: frozenset[str] | None = None) -> list[Row]:
        """Forget ``shard``'s read-ahead (it will not run here); returns its rows if they were read."""
        with self._lock:
            future = self._ahead.pop((shard.name, retry_ids), None)
        if future is None or future.cancel() or future.exception() is not None:
            return []
        return future.result()


#: Shards one actor holds at once: one generating and the one after it, which starts generating
#: as soon as the model is free — while the first one's last images are stored and committed.
SHARDS_PER_ACTOR = 2


@ray.remote(concurrency_groups={"prefetch": 1, "shards": SHARDS_PER_ACTOR})
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
        import torch

        from sdbatch.models.runtime import Generator

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
            from sdbatch.models.clip_score import ClipScorer

            scorer = ClipScorer.load(spec.scoring.clip_model, device=generator.info.device, endpoint_url=endpoint_url)
        self.runner = ShardRunner(generator, storage, spec, endpoint_url=endpoint_url, scorer=scorer,
                                  passthrough=passthrough_types(manifest), job_fingerprint=job_fingerprint)
        self.feed = ShardFeed(manifest, spec, endpoint_url)
        self.tracker = tracker
        self._turns = threading.Condition()
        self._turn = 0  # the turn that may use the model now

    def ready(self) -> dict[str, Any]:
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
