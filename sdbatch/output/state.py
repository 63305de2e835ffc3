"""A job's state, read from OUT alone and derived in one place: the job record, progress and
``_SUCCESS`` snapshots, the driver's lock (its age, whether its driver is alive), the committed
shards, the phase (not started, running, interrupted, finished, failed, ...) and the row counts.
``sdbatch status``, the report's summary and ``submit --dry-run`` all read it through
``read_state``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sdbatch.output.commits import count_committed
from sdbatch.output.documents import (
    LOCK_KEY,
    CorruptState,
    JobRecord,
    Progress,
    Success,
    read_json,
)
from sdbatch.output.lock import lock_is_stale
from sdbatch.storage.base import NotFound, Storage

INTERRUPTED_TEXT = "interrupted (no driver is running it; run the same command to resume)"


@dataclass(frozen=True)
class JobState:
    job: JobRecord
    progress: Progress | None
    success: Success | None
    lock: dict[str, Any] | None  # the running driver's lease, None when no driver holds OUT
    lock_age: float  # seconds since the lock's last heartbeat
    shards_committed: int  # counted from one listing, never held: 156,250 names at 10M rows
    unreadable: list[str] = field(default_factory=list)  # corrupt state files, each with its recovery

    @property
    def driver_alive(self) -> bool:
        return self.lock is not None and not lock_is_stale(self.lock, self.lock_age)

    @property
    def phase(self) -> str:
        """``finished``, progress.json's own word (``running``, ``failed``, ``interrupted``, ...),
        ``interrupted`` when it says running but no driver is alive, ``unknown`` when a state file
        cannot be read, else ``not started``."""
        if self.success:
            return "finished"
        if self.progress:
            # progress.json's last word came from a driver that died
            return "interrupted" if self.progress.state == "running" and not self.driver_alive else self.progress.state
        return "unknown" if self.unreadable else "not started"

    @property
    def phase_text(self) -> str:
        """The phase as ``status`` says it: an interrupted running job says how to resume."""
        if self.phase == "interrupted" and self.progress and self.progress.state == "running":
            return INTERRUPTED_TEXT
        return self.phase

    @property
    def rows_total(self) -> int:
        return self.job.manifest.num_rows

    @property
    def shards_total(self) -> int | None:
        """The plan's shard count (the plan needs the manifest; its driver wrote it), if known."""
        return self.progress.shards_total if self.progress is not None else None

    @property
    def rows(self) -> dict[str, int]:
        """``rows_done``, ``rows_failed`` and ``rows_remaining``: a finished job's from ``_SUCCESS``,
        a running one's from its progress, else none done."""
        if self.success:
            return {"rows_done": self.success.rows_ok, "rows_failed": self.success.rows_failed, "rows_remaining": 0}
        if self.progress:
            return {"rows_done": self.progress.rows_done, "rows_failed": self.progress.rows_failed_this_run,
                    "rows_remaining": self.progress.rows_remaining}
        return {"rows_done": 0, "rows_failed": 0, "rows_remaining": self.rows_total}

    @property
    def rows_in_flight(self) -> int:
        """Rows generated in shards not committed yet: not in ``rows_done``, and lost (generated again
        on resume) unless their shard commits."""
        return self.progress.rows_in_flight if self.progress and not self.success else 0

    @property
    def in_flight_text(self) -> str:
        """How ``status`` names the in-flight rows: a running driver may still commit them, a
        stopped one will not."""
        if not self.rows_in_flight:
            return ""
        if self.driver_alive:
            return f"{self.rows_in_flight} generated in shards not committed yet"
        return f"{self.rows_in_flight} generated in shards never committed (lost; generated again on resume)"

    @property
    def last_run(self) -> tuple[float | None, int, float | None]:
        """The last run's wall seconds, images generated and images/s: a finished job's from
        ``_SUCCESS`` (the record of the run that finished it), an unfinished one's from progress."""
        if self.success is not None:
            return (self.success.wall_seconds_this_run, self.success.rows_generated_this_run,
                    self.success.images_per_second_this_run)
        if self.progress is not None:
            return (_elapsed(self.progress.started_at, self.progress.updated_at), self.progress.rows_generated_this_run,
                    self.progress.images_per_second)
        return None, 0, None


def _elapsed(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def read_state(storage: Storage, *, num_shards: int | None = None, tolerate_corrupt: bool = False) -> JobState | None:
    """OUT's job state, or None when OUT holds no job record. ``num_shards`` (when the plan is
    known) bounds which metadata files are commits. A corrupt progress.json, ``_SUCCESS`` or lock
    raises ``CorruptState``, or with ``tolerate_corrupt`` is listed in ``unreadable`` and read as
    absent (``status`` shows what the other files tell)."""
    job = JobRecord.read(storage)
    if job is None:
        return None
    unreadable: list[str] = []

    def readable(read: Callable[[Storage], Any]) -> Any:
        try:
            return read(storage)
        except CorruptState as exc:
            if not tolerate_corrupt:
                raise
            unreadable.append(str(exc))
            return None

    progress = readable(Progress.read)
    success = readable(Success.read)
    lock = readable(lambda s: read_json(s, LOCK_KEY))
    try:
        lock_age = storage.age(LOCK_KEY) if lock is not None else 0.0
    except NotFound:  # released meanwhile
        lock, lock_age = None, 0.0
    return JobState(job=job, progress=progress, success=success, lock=lock, lock_age=lock_age,
                    shards_committed=count_committed(storage, num_shards), unreadable=unreadable)
