"""``OUT/report.html``: one self-contained page about a job, read from OUT alone.

Written at the end of every ``sdbatch submit`` run and by ``sdbatch report OUT`` (local or
``s3://``). It holds the summary (rows ok / failed / skipped, wall time, images/s, images per
GPU-hour, cost per 1,000 images when ``report.gpu_hour_usd`` is set), a throughput-over-time
chart (matplotlib, from ``progress.json``'s history), a per-worker table, the first failed rows
with their errors (both from one pass over a few index columns, a record batch at a time:
``IndexTally``) and a contact sheet of a sample of images with their prompts, of which only the
sampled rows are read whole (an image whose bytes are not the ones its index row recorded is
marked so). Memory does not grow with the index's rows.
Every asset is inlined (data URIs), so the page opens offline and from any bucket. The page is
a Jinja2 template (``templates/report.html.j2``); no torch is imported here.
"""

from __future__ import annotations

import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


#: The index columns the page's aggregates read, a record batch at a time.
TALLY_COLUMNS = ["row", "id", "status", "attempt", "error", "worker", "generate_seconds"]


@dataclass
class IndexTally:
    """What the page shows of the index, gathered a record batch at a time: rows ok and
    failed, per worker (rows ok, rows failed, generation seconds) and the first failed rows."""

    rows_ok: int = 0
    rows_failed: int = 0
    workers: dict[str, list[float]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_FAILURES_SHOWN

    def add(self, batch: pa.RecordBatch) -> None:
        status = batch.column("status")
        ok, failed = pc.equal(status, STATUS_OK), pc.equal(status, STATUS_FAILED)
        self.rows_ok += pc.sum(ok).as_py() or 0
        self.rows_failed += pc.sum(failed).as_py() or 0
        shown = MAX_FAILURES_SHOWN - len(self.failures)
        if shown > 0:
            self.failures += batch.filter(failed).slice(0, shown).to_pylist()
        per_worker = pa.table({
            "worker": pc.fill_null(batch.column("worker"), "?"), "ok": pc.fill_null(ok, False),
            "seconds": pc.fill_null(batch.column("generate_seconds").cast(pa.float64()), 0.0),
        }).group_by(["worker", "ok"], use_threads=False).aggregate([("seconds", "sum"), ("seconds", "count")])
        for worker, is_ok, seconds, rows in zip(*(per_worker.column(c).to_pylist() for c in
                                                  ("worker", "ok", "seconds_sum", "seconds_count"))):
            entry = self.workers.setdefault(worker, [0, 0, 0.0])
            entry[0 if is_ok else 1] += rows  # any status but ok counts as failed, as before
            entry[2] += seconds


def tally_index(job: JobOutput) -> IndexTally:
    tally = IndexTally()
    for batch in job.index.batches(TALLY_COLUMNS):
        tally.add(batch)
    return tally


def summarize(job: JobOutput, tally: IndexTally, state: JobState, gpu_hour_usd: float | None) -> Summary:
    """The page's numbers: the rows from the index so far, the last run's time and rate from
    the job's state (``output.state.JobState.last_run``)."""
    rows_ok, rows_failed = tally.rows_ok, tally.rows_failed
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


def worker_table(tally: IndexTally) -> list[dict[str, Any]]:
    """Per worker (over every run): rows ok and failed, generation seconds, images per
    generation-second."""
    return [
        {"worker": name, "rows_ok": int(ok), "rows_failed": int(failed), "generate_seconds": seconds,
         "images_per_second": ok / seconds if seconds else None}
        for name, (ok, failed, seconds) in sorted(tally.workers.items())
    ]


#: The images/s chart averages over this many seconds at least, and over a thirtieth of the job
#: at least: batches land whole, so a per-sample rate jumps between 0 and a batch's worth.
RATE_WINDOW_SECONDS = 60.0
RATE_WINDOWS_PER_CHART = 30


def moving_rate(history: list[tuple[float, int, int]], window: float) -> list[float]:
    """For each sample of ``history`` (time, rows done, ...) after the first: the images/s over
    the ``window`` seconds before it (from the latest sample at least that old, else the first)."""
    rates = []
    start = 0
    for end in range(1, len(history)):
        t1, d1 = history[end][0], history[end][1]
        while start + 1 < end and t1 - history[start + 1][0] >= window:
            start += 1
        t0, d0 = history[start][0], history[start][1]
        rates.append(max(0.0, (d1 - d0) / (t1 - t0)) if t1 > t0 else 0.0)
    return rates


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
    window = max(RATE_WINDOW_SECONDS, (history[-1][0] - t0) / RATE_WINDOWS_PER_CHART)
    rates = moving_rate(history, window)
    figure = Figure(figsize=(8, 3), dpi=100, layout="constrained")
    ax = figure.subplots()
    ax.plot(minutes, done, color="#1f77b4", label="rows done")
    ax.set_xlabel("minutes since the first run started")
    ax.set_ylabel("rows done", color="#1f77b4")
    rate_ax = ax.twinx()
    rate_ax.plot(minutes[1:], rates, color="#d62728", label="images/s")
    rate_ax.set_ylabel(f"images/s (moving average, {window / 60:.0f} min)" if window >= 90 else
                       f"images/s (moving average, {window:.0f} s)", color="#d62728")
    rate_ax.set_ylim(bottom=0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _sheet_ids(job: JobOutput, rows_ok: int, count: int) -> list[str]:
    """The ids of ``count`` of the ``rows_ok`` ok rows spread evenly over the job (every
    ``rows_ok // count``-th), found from the ``id`` and ``status`` columns a batch at a time."""
    step = max(1, rows_ok // count)
    wanted = np.arange(0, rows_ok, step)[:count]  # ranks among the ok rows
    ids: list[str] = []
    seen = 0  # ok rows before this batch
    for batch in job.index.batches(["id", "status"]):
        ok = np.flatnonzero(pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False).to_numpy(zero_copy_only=False))
        here = wanted[(wanted >= seen) & (wanted < seen + len(ok))] - seen
        if len(here):
            ids += batch.column("id").take(pa.array(ok[here])).to_pylist()
        seen += len(ok)
        if len(ids) == len(wanted):
            break
    return ids


def contact_sheet(job: JobOutput, rows_ok: int, count: int) -> list[dict[str, Any]]:
    """``count`` of the job's ``rows_ok`` ok rows spread evenly over the job, each with a
    thumbnail data URI: only those rows are read whole (``JobIndex.rows``)."""
    if not rows_ok or count <= 0:
        return []
    ids = _sheet_ids(job, rows_ok, count)
    found = job.index.rows(ids)
    sample = [found[i] for i in ids if i in found]

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
    tally = tally_index(job)
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sdbatch", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("report.html.j2").render(
        out=storage.url, mark=report_mark(job.job.fingerprint), job=job.job, spec=job.spec, summary=summarize(job, tally, state, price),
        success=success, chart=throughput_chart(progress.history if progress else []), workers=worker_table(tally),
        failures=tally.failures, failures_total=tally.rows_failed,
        sheet=contact_sheet(job, tally.rows_ok, job.spec.report.contact_sheet_images), generated_at=utc_now(),
    )


def import_renderers() -> None:
    """Import what rendering the page needs and the page's data does not (matplotlib, Jinja2,
    PIL), so that a caller can do it ahead, while the job runs (``job.submit``): the report at
    the job's end then only renders."""
    import jinja2  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: F401
    from PIL import Image  # noqa: F401


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
