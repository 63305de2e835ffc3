"""Running one shard end to end, Ray-free.

``ShardRunner`` is the Ray-free core: it reads each batch's init images while the batch
before it generates (``InitImageLoader``: at most ``resources.init_images_in_memory`` decoded
at once, never a whole shard), generates the canonical batches on the model's one thread
(``model_thread``; each batch comes back as one uint8 host array), and hands each image to the
store pool: encoding runs in processes, one per CPU of the worker (Pillow's encoders hold the
GIL: ``benchmarks/bench_png_gil.py``), hashing and the create-once writes on threads, so the
model never waits for encoding or a PUT while the bounded queue has room. A batch that runs
out of GPU memory is generated again in halves (each half is then its own batch, in
``batch_rows``); a row whose image came out NaN or black fails with that error. When every
image is stored it writes the shard index — the commit."""

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
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from PIL import Image

from sdbatch.data.index import STATUS_FAILED, STATUS_OK, index_schema
from sdbatch.data.record import ConditioningInputs, ImageRecord, conditioning_inputs, image_sha256_fields, index_row
from sdbatch.data.row import Row
from sdbatch.output import encode
from sdbatch.output.commits import commit_shard, metadata_key, read_commit, read_shard_index
from sdbatch.output.layout import ShardWriter, layout_for
from sdbatch.output.quality import measure_image
from sdbatch.run.batch_fit import BatchFit, parts
from sdbatch.run.feed import InitImageLoader, init_image_fix
from sdbatch.run.plan import ShardSpec, batch_id, canonical_batches
from sdbatch.run.protocol import PipelineError, RowError, ShardResult, describe, is_transient
from sdbatch.spec import JobSpec
from sdbatch.storage.base import Storage, StorageError
from sdbatch.storage.open import read_uri

if TYPE_CHECKING:
    import numpy as np

    from sdbatch.models.adapter import GeneratedBatch, LoadedModel
    from sdbatch.models.clip_score import ClipScorer

log = logging.getLogger("sdbatch.worker")


BatchCallback = Callable[[int, int], None]  # (rows done, rows failed) since the last call


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
        generator: LoadedModel,
        storage: Storage,
        spec: JobSpec,
        worker_name: str = "",
        endpoint_url: str | None = None,
        scorer: ClipScorer | None = None,
        passthrough: dict[str, pa.DataType] | None = None,
        *,
        job_fingerprint: str,
        batch_fit: BatchFit | None = None,
        model_thread: Executor | None = None,
    ):
        """``passthrough``: the manifest's passthrough columns and their types
        (``manifest.passthrough_types``), the last columns of every shard index written.
        ``batch_fit``: the batch size that fits the device per batch key (GPU workers).
        ``model_thread``: the one thread that runs every model call (generation, scoring), for
        a caller whose shards run on several threads (the worker actor); else the calling thread."""
        self.generator = generator
        self.model_thread = model_thread
        self.batch_fit = batch_fit
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
        self.init_images = InitImageLoader(self._load_images, self.pool, spec.resources.init_image_limit,
                                           spec.resources.batch_size)

    def _load_images(self, row: Row) -> dict[str, list[tuple[Image.Image, str]]]:
        """The row's conditioning images (``Row.images``): column → (image, sha256 hex of the bytes
        read) of each image it names, in order; RowError (or a transient StorageError) for the
        first that cannot be read."""
        return {column: [self._load_image(row.id, column, location) for location in locations]
                for column, locations in row.images().items()}

    def _load_image(self, row_id: str, column: str, location: str) -> tuple[Image.Image, str]:
        limits = self.spec.limits
        where = f"row {row_id}: {column} {location!r}"
        try:
            data = read_uri(location, endpoint_url=self.endpoint_url, max_bytes=limits.max_init_image_bytes)
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
            raise RowError(f"{where}: {describe(exc)}; fix: {init_image_fix(exc, column)}") from None
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
            good, loaded_in, hashes = [], [], {}
            for row in batch:
                try:
                    loaded = loading[row.id].result() if row.id in loading else {}
                except RowError as exc:
                    fail_row(row, str(exc))
                    continue
                good.append(row)
                loaded_in.append(loaded)
                hashes[row.id] = image_sha256_fields(loaded)
            if good:
                bid = batch_id(unit, number)
                handled: set[str] = set()  # rows of the parts generated before a pipeline exception
                try:
                    for part, generated, per_row in self._on_model_thread(self._generate_fitting, good,
                                                                          conditioning_inputs(good, loaded_in)):
                        batch_rows = [r.id for r in part]
                        scores = (self._on_model_thread(self.scorer.score, [r.prompt for r in part], generated.images())
                                  if self.scorer else [None] * len(part))
                        for i, (row, score) in enumerate(zip(part, scores)):
                            if generated.errors[i]:
                                index_rows.append(index_row(row, shard.name, status=STATUS_FAILED, error=generated.errors[i],
                                                            attempt=attempt, worker=self.worker_name))
                                result.rows_failed += 1
                                continue
                            record = ImageRecord.from_row(row, shard.name, bid, batch_rows, self.generator.facts(row),
                                                          **hashes[row.id])
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
            del loading, loaded_in  # the decoded images go with the last references to them
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

    def _on_model_thread(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on the model thread. One OS thread for the model, whichever shard's turn it
        is: each thread that calls torch on the CPU gets an OpenMP team of its own, and libgomp stops
        spinning between parallel regions once its teams hold more threads than there are CPUs, which
        made a CPU worker's batches 1.3–1.6× slower (``benchmarks/bench_model_thread.py``); and
        torch.compile keeps its CUDA graphs per thread (``cudagraph_trees``), so one thread records
        them once."""
        return call(*args) if self.model_thread is None else self.model_thread.submit(call, *args).result()

    def _generate_fitting(
        self, rows: list[Row], conditioning: ConditioningInputs,
    ) -> list[tuple[list[Row], GeneratedBatch, float]]:
        """Generate ``rows`` as one batch, or as parts of the size that fits the device
        (``batch_fit``), or, when the device runs out of memory, as halves (recursively; one
        row that does not fit fails the shard). Returns (rows, their batch, seconds per row)
        for each part generated."""
        def generate_part(cut: slice) -> list[tuple[list[Row], GeneratedBatch, float]]:
            return self._generate_fitting(rows[cut], conditioning.pick(range(len(rows))[cut]))

        fitting = self.batch_fit.size_for(rows, conditioning) if self.batch_fit else len(rows)
        if len(rows) > fitting:
            return [part for cut in parts(rows, fitting) for part in generate_part(cut)]

        t0 = time.perf_counter()
        try:
            generated = self.generator.generate(rows, conditioning)
        except Exception as exc:
            if len(rows) == 1 or not self.generator.recovered_from_out_of_memory(exc):
                raise
            half = (len(rows) + 1) // 2
            log.warning("a batch of %d rows ran out of device memory: generating it as %d + %d rows",
                        len(rows), half, len(rows) - half)
            return [part for cut in (slice(None, half), slice(half, None)) for part in generate_part(cut)]
        return [(rows, generated, (time.perf_counter() - t0) / len(rows))]
