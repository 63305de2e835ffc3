"""Progress: the driver's live view (a rich bar on a terminal, log lines otherwise), the
``_sdbatch/progress.json`` snapshot that ``sdbatch status`` reads from any machine (with
per-worker rates and a bounded history of rows done over time, kept across resumes, that
``report.html`` charts), and the job-level Prometheus gauges (``metrics``)."""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from sdbatch.output.documents import Progress, WorkerProgress, utc_now
from sdbatch.run import metrics
from sdbatch.storage.base import Storage, StorageError

log = logging.getLogger("sdbatch.progress")


MAX_HISTORY = 720  # samples kept in progress.json; older ones are thinned out to stay under it


class _ConsoleLogging(logging.Handler):
    """While the bar is live, the root logger's terminal handlers print through the bar's
    console, which writes each line above the bar; written straight to the terminal (the
    stream a handler holds), a line lands in the middle of the bar."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console
        terminal = {id(s) for s in (console.file, sys.stderr, sys.__stderr__, sys.stdout, sys.__stdout__)}
        root = logging.getLogger()
        self.replaced = [h for h in root.handlers
                         if type(h) is logging.StreamHandler and id(h.stream) in terminal]  # not files, not test capture
        if self.replaced:
            self.setLevel(min(h.level for h in self.replaced))
            self.setFormatter(self.replaced[0].formatter)
            for handler in self.replaced:
                root.removeHandler(handler)
            root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # as logging's own handlers: a failed log line never stops the job
            self.handleError(record)

    def restore(self) -> None:
        root = logging.getLogger()
        if self.replaced:
            root.removeHandler(self)
            for handler in self.replaced:
                root.addHandler(handler)


def local_time(epoch: float) -> str:
    """An epoch time as a reader wants it: local clock time with its zone."""
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 shard``, ``2 shards``; ``nouns`` for a plural that is not noun + s (``batches``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def devices_text(workers: int, gpus_per_worker: float) -> str:
    """``2 workers × 1 GPU``, ``4 workers × 0.5 GPU``; CPU workers are their own devices: ``1 worker``."""
    if not gpus_per_worker:
        return plural(workers, "worker")
    gpus = plural(int(gpus_per_worker), "GPU") if gpus_per_worker == int(gpus_per_worker) else f"{gpus_per_worker:g} GPU"
    return f"{plural(workers, 'worker')} × {gpus}"


def eta_text(seconds: float | None) -> str:
    """``ETA 4m 05s``; ``ETA unknown`` before the first image gives a rate."""
    if seconds is None:
        return "ETA unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}h {minutes:02d}m" if hours else f"ETA {minutes}m {secs:02d}s" if minutes else f"ETA {secs}s"


class ProgressFeed:
    """Counts rows of this run on top of what OUT already held, shows them, and snapshots
    them to storage every ``write_every`` seconds (a failed write is logged, never fatal)."""

    def __init__(
        self,
        storage: Storage,
        *,
        total_rows: int,
        rows_already_done: int,
        shards_total: int,
        shards_committed: int,
        interactive: bool | None = None,
        console: Console | None = None,
        write_every: float = 3.0,
        log_every: float = 15.0,
    ):
        self.storage = storage
        self.total = total_rows
        self.base_done = rows_already_done
        self.shards_total = shards_total
        self.shards_committed = shards_committed
        self.done = 0
        self.in_flight = 0
        self.failed = 0
        self.shards_failed = 0
        self.failed_shards: list[dict[str, Any]] = []  # at the end: shard, attempts, last error
        self.workers = 0
        self.per_worker: dict[str, list[float]] = {}
        self.history = self._previous_history()
        self.state = "running"
        self.started_at = utc_now()
        self._t0 = time.monotonic()
        self._last_write = 0.0
        self._last_log = time.monotonic()
        self.write_every = write_every
        self.log_every = log_every
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: ProgressBar | None = None
        if interactive:
            self._bar = ProgressBar(
                TextColumn("[bold]sdbatch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows · {task.fields[failed]} failed · {task.fields[rate]:.2f} img/s"),
                TimeElapsedColumn(),
                # the snapshot's ETA, not rich's TimeRemainingColumn: that one divides by its own speed over
                # the last 30 s of bar updates (model loading left out, whole batches landing at once), so it
                # disagreed with the img/s beside it and with `status` (0:00:23 for 80 rows at 0.49 img/s)
                TextColumn("{task.fields[eta]}"),
                console=console or Console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task("rows", total=total_rows, completed=rows_already_done, failed=0, rate=0.0,
                                            eta=eta_text(None))
            self._logging = _ConsoleLogging(self._bar.console)
            self._bar.start()

    def _previous_history(self) -> list[list[float]]:
        """The samples of earlier runs of this job, so the chart covers every run."""
        try:
            previous = Progress.read(self.storage)
        except StorageError as exc:
            log.warning("could not read the previous progress.json: %s", exc)
            return []
        return [list(sample) for sample in previous.history] if previous is not None else []

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.done / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> Progress:
        done_total = self.base_done + self.done + self.failed
        remaining = max(0, self.total - done_total)
        rate = self.rate
        return Progress(
            state=self.state,
            rows_total=self.total,
            rows_done=self.base_done + self.done - self.in_flight,
            rows_in_flight=self.in_flight,
            rows_failed_this_run=self.failed,
            rows_remaining=remaining,
            rows_generated_this_run=self.done,
            images_per_second=round(rate, 3),
            eta_seconds=round(remaining / rate, 1) if rate > 0 else None,
            shards_total=self.shards_total,
            shards_committed=self.shards_committed,
            shards_failed=self.shards_failed,
            failed_shards=self.failed_shards,
            workers=self.workers,
            per_worker={
                name: WorkerProgress(rows_done=int(done), rows_failed=int(failed),
                                     images_per_second=round(done / (last - first), 3) if last > first else None)
                for name, (done, failed, first, last) in sorted(self.per_worker.items())
            },
            history=self.history,
            started_at=self.started_at,
            updated_at=utc_now(),
        )

    def update(self, done: int, failed: int, *, shards_committed: int, shards_failed: int, workers: int,
               in_flight: int = 0, per_worker: dict[str, list[float]] | None = None) -> None:
        """Set this run's cumulative counts (rows generated/failed, including in-flight shards;
        ``in_flight``: how many of the generated rows are in shards not yet committed;
        ``per_worker``: worker -> [rows done, rows failed, first report, last report])."""
        self.done, self.failed, self.in_flight = done, failed, in_flight
        self.shards_committed, self.shards_failed, self.workers = shards_committed, shards_failed, workers
        if per_worker is not None:
            self.per_worker = per_worker
        metrics.job_progress(self.snapshot())
        now = time.monotonic()
        snap = self.snapshot()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.base_done + done + failed, failed=failed,
                             rate=snap.images_per_second, eta=eta_text(snap.eta_seconds))
        elif now - self._last_log >= self.log_every:
            self._last_log = now
            log.info(
                "%d/%d rows done, %d failed, %.2f img/s, %s",
                snap.rows_done, self.total, failed, snap.images_per_second, eta_text(snap.eta_seconds),
            )
        if now - self._last_write >= self.write_every:
            self.write()

    def write(self) -> None:
        self._last_write = time.monotonic()
        self.history.append([round(time.time(), 1), self.base_done + self.done, self.failed])
        if len(self.history) > MAX_HISTORY:  # thin the older half, keep the recent samples dense
            half = len(self.history) // 2
            self.history[:half] = self.history[:half:2]
        try:
            self.snapshot().write(self.storage)
        except StorageError as exc:
            log.warning("could not write progress.json: %s", exc)

    def close(self, state: str, failed_shards: list[dict[str, Any]] | None = None) -> None:
        """The run's last snapshot: its end state and the shards it failed (``Schedule.failures``)."""
        self.state = state
        self.failed_shards = failed_shards or []
        if self._bar is not None:
            self._bar.stop()
            self._logging.restore()
        self.write()
