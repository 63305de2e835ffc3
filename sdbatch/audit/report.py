"""``OUT/report.html``: one self-contained page about a job, read from OUT alone.

Written at the end of every ``sdbatch submit`` run and by ``sdbatch report OUT`` (local or
``s3://``). It holds the summary (rows ok / failed / skipped, wall time, images/s, images per
GPU-hour, cost per 1,000 images when ``report.gpu_hour_usd`` is set), a throughput-over-time
chart (matplotlib, from ``progress.json``'s history), a per-worker table (from the index), the
failed rows with their errors and a contact sheet of a sample of images with their prompts
(an image whose bytes are not the ones its index row recorded is marked so).
Every asset is inlined (data URIs), so the page opens offline and from any bucket. The page is
a Jinja2 template (``templates/report.html.j2``); no torch is imported here.
"""

from __future__ import annotations

import base64
import io
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sdbatch.audit.job_output import AuditError, JobOutput, open_job
from sdbatch.data.index import STATUS_FAILED, STATUS_OK
from sdbatch.output.claim import REPORT_KEY, put_report, report_mark
from sdbatch.output.commits import OutputMismatch
from sdbatch.output.documents import utc_now
from sdbatch.output.layout import differs
from sdbatch.output.state import JobState, read_state
from sdbatch.run.progress import devices_text
from sdbatch.storage.base import Storage, StorageError

log = logging.getLogger("sdbatch.report")


THUMBNAIL_PX = 128
MAX_FAILURES_SHOWN = 200


@dataclass
class Summary:
    rows_total: int
    rows_ok: int
    rows_failed: int
    rows_skipped: int  # not (yet) in the index: the job is unfinished
    finished: bool
    wall_seconds: float | None  # the last run's
    images_this_run: int
    images_per_second: float | None
    device: str  # "GPU" or "worker" (CPU workers): what one device-hour is
    devices: str  # what the job ran on: "2 workers × 1 GPU", "1 worker" (CPU workers)
    device_hours: float | None
    images_per_device_hour: float | None
    cost_per_1000: float | None
    gpu_hour_usd: float | None


def summarize(job: JobOutput, state: JobState, gpu_hour_usd: float | None) -> Summary:
    """The page's numbers: the rows from the index so far, the last run's time and rate from
    the job's state (``output.state.JobState.last_run``)."""
    statuses = [r["status"] for r in job.index]
    rows_ok, rows_failed = statuses.count(STATUS_OK), statuses.count(STATUS_FAILED)
    rows_total = state.rows_total
    wall, images, rate = state.last_run
    res = job.spec.resources
    per_worker = res.gpus_per_worker or 1.0  # a CPU worker counts as one device
    device_hours = wall * res.workers * per_worker / 3600 if wall else None
    per_hour = images / device_hours if device_hours and images else None
    cost = 1000 * gpu_hour_usd / per_hour if gpu_hour_usd is not None and per_hour else None
    return Summary(
        rows_total=rows_total, rows_ok=rows_ok, rows_failed=rows_failed,
        rows_skipped=max(0, rows_total - rows_ok - rows_failed), finished=state.phase == "finished",
        wall_seconds=wall, images_this_run=images, images_per_second=rate,
        device="GPU" if res.gpus_per_worker else "worker", devices=devices_text(res.workers, res.gpus_per_worker),
        device_hours=device_hours,
        images_per_device_hour=per_hour, cost_per_1000=cost, gpu_hour_usd=gpu_hour_usd,
    )


def worker_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker (over every run): rows ok and failed, generation seconds, images per
    generation-second."""
    tally: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for row in rows:
        entry = tally[row.get("worker") or "?"]
        entry[0 if row["status"] == STATUS_OK else 1] += 1
        entry[2] += row.get("generate_seconds") or 0.0
    return [
        {"worker": name, "rows_ok": int(ok), "rows_failed": int(failed), "generate_seconds": seconds,
         "images_per_second": ok / seconds if seconds else None}
        for name, (ok, failed, seconds) in sorted(tally.items())
    ]


def throughput_chart(history: list[tuple[float, int, int]]) -> str | None:
    """A PNG data URI: rows done and images/s over time, or None with under two samples."""
    if len(history) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    t0 = history[0][0]
    minutes = [(t - t0) / 60 for t, _, _ in history]
    done = [d for _, d, _ in history]
    rates = [max(0.0, (d1 - d0) / (t1 - t0_)) if t1 > t0_ else 0.0
             for (t0_, d0, _), (t1, d1, _) in zip(history, history[1:])]
    figure = Figure(figsize=(8, 3), dpi=100, layout="constrained")
    ax = figure.subplots()
    ax.plot(minutes, done, color="#1f77b4", label="rows done")
    ax.set_xlabel("minutes since the first run started")
    ax.set_ylabel("rows done", color="#1f77b4")
    rate_ax = ax.twinx()
    rate_ax.step(minutes[1:], rates, where="pre", color="#d62728", label="images/s")
    rate_ax.set_ylabel("images/s", color="#d62728")
    rate_ax.set_ylim(bottom=0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def contact_sheet(job: JobOutput, count: int) -> list[dict[str, Any]]:
    """``count`` ok rows spread evenly over the job, each with a thumbnail data URI."""
    ok = [r for r in job.index if r["status"] == STATUS_OK]
    if not ok or count <= 0:
        return []
    step = max(1, len(ok) // count)
    sample = ok[::step][:count]

    layout = job.layout

    def thumbnail(row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        entry = {"id": row["id"], "prompt": row["prompt"], "seed": row["seed"], "src": None, "mismatch": None}
        try:
            data = layout.read(row["key"])
            problem = differs(row, data)
            if problem:  # still shown, but marked: the index, not the object, is what the job made
                entry["mismatch"] = f"not the image the index recorded ({problem}); `sdbatch verify` lists every such row"
            image = Image.open(io.BytesIO(data))
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            entry["src"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        except (StorageError, OSError) as exc:  # shown as missing; `sdbatch verify` says more
            entry["error"] = str(exc)
        return entry

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(thumbnail, sample))


def render_report(job: JobOutput, gpu_hour_usd: float | None = None) -> str:
    """The HTML page for ``job`` (``gpu_hour_usd`` overrides the spec's), marked as its own
    (``output.report_mark``)."""
    import jinja2

    storage = job.storage
    state = read_state(storage)
    assert state is not None  # open_job found the job record
    success, progress = state.success, state.progress
    price = gpu_hour_usd if gpu_hour_usd is not None else job.spec.report.gpu_hour_usd
    failures = [r for r in job.index if r["status"] == STATUS_FAILED]
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sdbatch", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html.j2").render(
        out=storage.url, mark=report_mark(job.job.fingerprint), job=job.job, spec=job.spec, summary=summarize(job, state, price),
        success=success, chart=throughput_chart(progress.history if progress else []), workers=worker_table(job.index),
        failures=failures[:MAX_FAILURES_SHOWN], failures_total=len(failures),
        sheet=contact_sheet(job, job.spec.report.contact_sheet_images), generated_at=utc_now(),
    )


def write_report(storage: Storage, gpu_hour_usd: float | None = None) -> str:
    """Render the report and store it as ``OUT/report.html`` — create-once, or in place of this
    job's own earlier report only (``output.put_report``); returns its location."""
    job = open_job(storage)
    put_report(storage, render_report(job, gpu_hour_usd).encode(), job.job.fingerprint)
    return f"{storage.url.rstrip('/')}/{REPORT_KEY}"


def write_report_quietly(storage: Storage) -> str | None:
    """End of a run: a report that cannot be written is a warning, never the job's failure."""
    try:
        return write_report(storage)
    except (AuditError, OutputMismatch, StorageError, OSError) as exc:
        log.warning("could not write %s: %s (run `sdbatch report OUT` to retry)", REPORT_KEY, exc)
        return None
