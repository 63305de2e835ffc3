"""Feeding a worker's shard: its rows read ahead from the manifest and their input images (init
images, control images) loaded."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sdbatch.data.row import Row
from sdbatch.manifest.reader import ManifestReader
from sdbatch.manifest.sources import Manifest
from sdbatch.run.plan import ShardSpec
from sdbatch.spec import JobSpec
from sdbatch.storage.base import NotFound, StorageConfigError, StorageError, TooLarge


def init_image_fix(exc: StorageError, column: str = "init_image") -> str:
    """The fix for a conditioning image (``column``) that could not be read."""
    if isinstance(exc, TooLarge):
        return "shrink the file, or raise limits.max_init_image_bytes"
    if isinstance(exc, NotFound):
        return f"correct the path (absolute, or relative to the manifest), or clear {column} for this row"
    if isinstance(exc, StorageConfigError):
        return "make the file readable by the workers"
    return f"point {column} at a regular image file"


class InitImageLoader:
    """A worker's conditioning images (every ``Row.images()`` of a row: init image, mask, control
    images), read and decoded on the store pool a batch ahead of the batch that uses them, at
    most ``limit`` rows' held at once (counted from the start of a read until the batch is
    generated, or its shard ends). ``take`` starts whatever of a batch is not started
    yet, room or not (the batch must run); ``ahead`` starts a later batch only within
    ``limit - batch_size``, so that the next ``take`` always fits under ``limit``."""

    def __init__(self, load: Callable[[Row], Any], pool: ThreadPoolExecutor, limit: int,
                 batch_size: int):
        self._load = load
        self._pool = pool
        self.limit = limit
        self.ahead_limit = limit - batch_size
        self._held: dict[str, Future] = {}  # row id -> future of what ``load`` returns, or RowError
        self._ahead: set[str] = set()  # the held ones started by ``ahead``, not taken yet
        self._lock = threading.Lock()  # ``ahead`` also runs on the feed's thread

    @property
    def held(self) -> int:
        return len(self._held)

    def ahead(self, rows: list[Row]) -> bool:
        """Start reading ``rows``' init images if all of them fit; False if they wait for ``take``."""
        with self._lock:
            new = [r for r in rows if r.images() and r.id not in self._held]
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
                if row.images() and row.id not in self._held:
                    self._held[row.id] = self._pool.submit(self._load, row)
                self._ahead.discard(row.id)
            return {r.id: self._held[r.id] for r in rows if r.images()}

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
