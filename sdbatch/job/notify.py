"""End-of-job notifications (``submit --notify URL``): one JSON POST when the job ends,
whatever the end — done, rows failed, stopped at the deadline, refused, failed, interrupted or
a bug — so an overnight run reports itself. A notification that cannot be delivered is a
warning, never the job's failure. The URL may carry a token (``?token=…``, ``user:pass@``):
only its scheme, host and path are ever logged."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sdbatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_ROWS_FAILED,
    EXIT_SHARDS_FAILED,
    EXIT_STOPPED,
    BadInput,
    SdbatchError,
)

log = logging.getLogger("sdbatch.notify")

#: Seconds the webhook has to answer: a hung receiver must not hold the job's exit.
NOTIFY_TIMEOUT_S = 10.0

#: The ``state`` a notification carries, by the command's exit code.
STATE_BY_EXIT_CODE = {
    EXIT_OK: "done", EXIT_BUG: "crashed", EXIT_BAD_INPUT: "refused", EXIT_ROWS_FAILED: "rows_failed",
    EXIT_STOPPED: "stopped", EXIT_SHARDS_FAILED: "failed", EXIT_INTERRUPTED: "interrupted",
}


def redacted(url: str) -> str:
    """``url`` as it may be logged: no user, password, query or fragment (where tokens go)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def check_notify_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"--notify {redacted(url)!r}: not an http:// or https:// URL; give the webhook's full URL, "
                       "e.g. https://hooks.example.com/sdbatch?token=…")
    return url


@dataclass
class JobEnd:
    """What the notification says; the submit command fills it in as it learns it."""

    out: str | None = None
    rows: dict[str, int] = field(default_factory=dict)  # total, generated, failed
    failures: dict[str, Any] = field(default_factory=dict)  # rows, shards
    report_url: str | None = None
    message: str = ""

    def payload(self, exit_code: int) -> dict[str, Any]:
        return {"state": STATE_BY_EXIT_CODE.get(exit_code, "failed"), "exit_code": exit_code, "out": self.out,
                "rows": self.rows, "failures": self.failures, "report_url": self.report_url, "message": self.message}


def post_notification(url: str, payload: dict[str, Any]) -> bool:
    """POST ``payload`` as JSON to ``url``; a failure is logged (URL redacted), not raised."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "sdbatch"})
    try:
        with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT_S) as response:
            log.info("notified %s: job %s (HTTP %d)", redacted(url), payload["state"], response.status)
            return True
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        log.warning("could not notify %s that the job ended (%s): %s", redacted(url), payload["state"],
                    str(reason).replace(url, redacted(url)))
        return False


@contextmanager
def notifying(url: str | None) -> Iterator[JobEnd]:
    """Around a job's run: when it ends, however (an exception is re-raised after), POST its end
    to ``url`` (None: nothing)."""
    end = JobEnd()
    try:
        yield end
    except BaseException as exc:
        if url:
            code = exc.exit_code if isinstance(exc, SdbatchError) else (
                EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else getattr(exc, "exit_code", EXIT_BUG))
            if isinstance(exc, SystemExit):
                code = exc.code if isinstance(exc.code, int) else EXIT_BUG
            end.message = end.message or str(exc) or type(exc).__name__
            post_notification(url, end.payload(code))
        raise
    if url:
        post_notification(url, end.payload(EXIT_OK))
