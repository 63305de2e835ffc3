"""The submit use case's run: OUT's access checked, then ``run.driver.run_job`` (lock, claim,
plan, run every pending shard, merge the index), then the report. Returns a value the CLI
prints; nothing here prints."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from sdbatch.audit.report import import_renderers, write_report_quietly
from sdbatch.job.preflight import PreparedJob
from sdbatch.job.repair import repair_rows
from sdbatch.run.driver import JobOutcome, run_job

log = logging.getLogger("sdbatch.submit")


@dataclass(frozen=True)
class SubmitOutcome:
    run: JobOutcome
    wall_seconds: float  # the whole run, lock and claim included
    report_url: str | None  # None when the report could not be written (logged as a warning)

    @property
    def images_per_second(self) -> float:
        return self.run.rows_generated / self.wall_seconds if self.wall_seconds > 0 else 0.0


def submit(prepared: PreparedJob) -> SubmitOutcome:
    request, storage = prepared.request, prepared.storage
    storage.check_access()
    # the report's libraries are imported while the driver mostly waits on Ray and the workers,
    # not after the last image (a daemon: an ended job leaves without waiting for it)
    threading.Thread(target=import_renderers, name="report-imports", daemon=True).start()
    started = time.monotonic()
    outcome = run_job(
        prepared.spec, prepared.source, storage, prepared.job, address=request.address, endpoint_url=request.endpoint_url,
        deadline=request.deadline_at, retry_failed=request.retry_failed, repair=repair_rows if request.repair else None,
        new_run=request.new_run,
    )
    wall = time.monotonic() - started
    log.info("writing the report")
    return SubmitOutcome(outcome, wall, write_report_quietly(storage))
