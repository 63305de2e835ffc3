"""What a worker tells the driver: a shard's result, and the failure classes.

Failure classes (design.md §7.1): a problem of one row (its init image, its metadata) fails that
row with an error naming the exception, the row and the fix; an exception the pipeline
raises for a batch is retried once, on a fresh worker (``PipelineError``), and then fails that
batch's rows; transient failures (storage outages, CUDA out of memory) propagate so the
driver re-queues the shard; the other rows of the shard commit in every case."""

from __future__ import annotations

from dataclasses import dataclass

from sdbatch.errors import SdbatchError
from sdbatch.storage.base import StorageError


@dataclass
class ShardResult:
    """What a worker returns for one unit of work."""

    shard: str
    rows_ok: int = 0
    rows_failed: int = 0
    images_created: int = 0
    images_adopted: int = 0
    generate_seconds: float = 0.0
    wall_seconds: float = 0.0
    committed: bool = True  # False: an earlier attempt had already committed this shard
    worker: str = ""
    deferred: bool = False  # True: not started, the deadline had passed; nothing was written
    prompts_truncated: int = 0  # rows whose prompt the text encoder read only in part


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
