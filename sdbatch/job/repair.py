"""``--repair``: the rows ``verify`` flags (image missing, or not matching its recorded sha256),
found for the driver, which regenerates them. It lives above ``run`` and ``audit`` so the driver
needs no reader of OUT: ``run_job(repair=repair_rows)``."""

from __future__ import annotations

import logging

from sdbatch.audit.job_output import open_job
from sdbatch.audit.verify import verify
from sdbatch.storage.base import Storage

log = logging.getLogger("sdbatch.scheduler")


def repair_rows(storage: Storage) -> dict[str, set[str]]:
    """The flagged row ids by shard; a mismatched image is deleted first, so its row is written
    again through the create-once commit path."""
    report = verify(storage)
    flagged_ids = [row_id for row_id, *_ in report.missing + report.mismatched]
    shard_of = {row_id: entry["shard"] for row_id, entry in open_job(storage).index.rows(flagged_ids).items()}
    for _, key, *_ in report.mismatched:
        storage.delete(key)
    flagged: dict[str, set[str]] = {}
    for row_id in flagged_ids:
        flagged.setdefault(shard_of[row_id], set()).add(row_id)
    log.info("--repair: %d images missing, %d not matching their recorded sha256", len(report.missing), len(report.mismatched))
    return flagged
