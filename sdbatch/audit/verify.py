"""``verify``: every indexed object of a job's output is there and intact (its bytes hash to the
recorded sha256), the index agrees with job.json, the manifest and the shards' commits, and —
with ``--regenerate`` — a sample of rows regenerates to the same bytes (``reproduce``, which
imports torch only then). The index is read a batch at a time, once into ``index_check`` and
``object_check``'s tasks (which run shard by shard in Ray tasks or in this process);
``--listing-only`` reads no object nor any commit (their listing is checked against the index's
shards); ``--sample N`` draws N random ok rows first (a pass over four columns), then checks as
``--listing-only`` does and reads those rows' objects and their shards' commits in full.
Memory does not grow with the job's rows beyond two bits per row and three numbers per commit."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.audit.index_check import SAMPLE_COLUMNS, IndexChecks, RowSample
from sdbatch.audit.job_output import AuditError, JobOutput, open_job
from sdbatch.audit.object_check import (
    CHECK_COLUMNS,
    TASK_ROWS,
    CommitSource,
    Findings,
    ShardChecks,
    ShardDispatch,
    commit_listing_problems,
    listed_commits,
    sweep_orphans,
)
from sdbatch.audit.reproduce import Reproducer, ReproduceResult
from sdbatch.data.index import INDEX_COLUMN_TYPES
from sdbatch.output.commits import committed_shards, metadata_key
from sdbatch.output.documents import SUCCESS_KEY
from sdbatch.output.index import INDEX_KEY, merge_index
from sdbatch.output.quality import DuplicateRule
from sdbatch.run.progress import plural
from sdbatch.storage.base import Storage, StorageError

#: How verify reads objects: every one in full, a sample in full (the rest from listings), or none.
FULL, SAMPLE, LISTING = "full", "sample", "listing"


@dataclass
class VerifyReport:
    url: str
    index_source: str
    finished: bool
    rows_total: int  # rows in the manifest (job.json)
    rows_in_index: int
    rows_failed: int  # status=failed rows: no object expected
    ok: int = 0
    # findings: the first object_check.KEPT of each kind kept (``Findings.total`` counts them all)
    missing: Findings[tuple[str, str]] = field(default_factory=Findings)  # (id, key)
    mismatched: Findings[tuple[str, str, str]] = field(default_factory=Findings)  # (id, key, what)
    duplicates: Findings[str] = field(default_factory=Findings)  # ids indexed more than once
    orphans: Findings[str] = field(default_factory=Findings)  # objects no committed index row names
    foreign: Findings[tuple[str, str]] = field(default_factory=Findings)  # (id, key): an object there that is not the row's
    index_problems: list[str] = field(default_factory=list)  # the index disagrees with job.json, manifest or commits
    notes: list[str] = field(default_factory=list)
    mode: str = FULL
    checked_by: str = "this process"
    read: int = 0  # ok rows whose object was read and hashed
    sample_seed: int | None = None
    sampled: list[str] = field(default_factory=list)  # --sample: the ids of the rows read in full, in row order
    regenerate_seed: int | None = None
    regenerated: list[ReproduceResult] = field(default_factory=list)
    regenerate_errors: list[tuple[str, str]] = field(default_factory=list)  # (id, message)

    @property
    def drift(self) -> list[ReproduceResult]:
        return [r for r in self.regenerated if not r.match]

    @property
    def clean(self) -> bool:
        """Orphans do not count: readers trust the index, never a listing (design.md §5.3)."""
        return not (self.missing or self.mismatched or self.duplicates or self.drift or self.regenerate_errors
                    or self.foreign or self.index_problems)

    def render(self, limit: int = 20) -> str:
        lines = [
            f"verify {self.url}",
            f"  index      {self.index_source}; {self.rows_in_index} rows"
            + (f" of {self.rows_total}" if self.rows_total != self.rows_in_index else "")
            + ("" if self.finished else " (job not finished)"),
            f"  checked    by {self.checked_by}",
            f"  ok         {self.ok} objects present with the recorded size" + {
                FULL: " and sha256",
                SAMPLE: f"; the {self.read} of the sample read in full: sha256 checked too",
                LISTING: " (listing only: contents not read, a same-size corruption is not seen)",
            }[self.mode],
        ]
        if self.sample_seed is not None:
            shown = ", ".join(self.sampled[:limit]) + (f" … (+{len(self.sampled) - limit} more)" if len(self.sampled) > limit else "")
            lines.append(f"  sample     {len(self.sampled)} random ok rows (seed {self.sample_seed}): {shown}")
        if self.rows_failed:
            lines.append(f"  failed     {self.rows_failed} rows have status=failed (no image; see the index's error column)")

        def section(title: str, items: list[str], total: int | None = None) -> None:
            total = len(items) if total is None else total
            lines.append(f"  {title:<10} {total}")
            lines.extend(f"    {x}" for x in items[:limit])
            if total > limit:
                lines.append(f"    … and {total - limit} more")

        lines.extend(f"  note       {n}" for n in self.notes)
        if self.index_problems:
            section("index", self.index_problems)
        if self.foreign:
            section("foreign", [f"{i}  {k}  (an object sdbatch did not write sits at this row's key; the row failed)"
                                for i, k in self.foreign[:limit]], self.foreign.total)
        section("missing", [f"{i}  {k}" for i, k in self.missing[:limit]], self.missing.total)
        section("mismatched", [f"{i}  {k}  ({w})" for i, k, w in self.mismatched[:limit]], self.mismatched.total)
        if self.duplicates:
            section("duplicates", self.duplicates, self.duplicates.total)
        section("orphans", self.orphans, self.orphans.total)
        if self.orphans:
            lines.append("             (not an error: no committed index row names them, so no reader sees them — "
                         "writes of shards still running, or leftovers of a dead attempt, safe to delete once the job is finished)")
        if self.regenerate_seed is not None:
            exact = sum(r.match for r in self.regenerated)
            lines.append(f"  regenerate {len(self.regenerated)} rows (seed {self.regenerate_seed}): {exact} exact byte matches, "
                         f"{len(self.drift)} drifted, {len(self.regenerate_errors)} could not be regenerated")
            diffs = [r.max_pixel_diff for r in self.regenerated if r.max_pixel_diff is not None]
            if diffs:
                lines.append(f"             largest pixel difference {max(diffs)}")
            for r in self.regenerated:
                lines.append(f"    {r.summary()}")
                lines.extend(f"      note: {n}" for n in r.notes)
            for i, msg in self.regenerate_errors:
                lines.append(f"    {i}: cannot regenerate: {msg}")
        lines.append("  result     " + ("clean" if self.clean else "PROBLEMS FOUND"))
        return "\n".join(lines)


def verify(
    storage: Storage | str,
    *,
    regenerate: int = 0,
    seed: int | None = None,
    endpoint_url: str | None = None,
    threads: int = 16,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
    rebuild_index: bool = False,
    workers: int | None = 0,
    address: str | None = None,
    sample: int = 0,
    listing_only: bool = False,
    bar: bool = False,
) -> VerifyReport:
    """Check the index against ``job.json``, the manifest (when reachable) and the commits,
    every index row's object (exists, recorded size, recorded sha256: read in full; with
    ``listing_only``, none read, and the commits only listed: each indexed shard has one, each
    one's shard is indexed; with ``sample``, as ``listing_only`` and then that many random ok
    rows read in full, their shards' commits compared with the index), list orphan objects, and optionally regenerate
    ``regenerate`` random ok rows and report drift. Random rows are chosen with ``seed`` (a
    random seed is drawn and reported when none is given). Objects are checked shard by shard
    in ``workers`` Ray tasks at a time (None: the job's ``resources.workers``, as submit, or 0
    for a job of at most ``TASK_ROWS`` rows; on the cluster at ``address``, else a local one),
    or in this process when ``workers`` is 0; ``bar`` shows a progress bar. ``rebuild_index`` first
    rewrites a finished job's missing, corrupt or incomplete index from its commits."""
    if sample and listing_only:
        raise AuditError("--sample reads rows in full and --listing-only reads none: choose one")
    out = open_job(storage, endpoint_url=endpoint_url)
    storage = out.storage
    rebuilt = None
    if rebuild_index:
        rebuilt = _rebuild_index(out, progress)
        out = open_job(storage)
    report = VerifyReport(url=storage.url, index_source=out.index_source, finished=out.finished,
                          rows_total=out.job.manifest.num_rows, rows_in_index=0, rows_failed=0,
                          mode=SAMPLE if sample else LISTING if listing_only else FULL)
    if rebuilt:
        report.notes.append(rebuilt)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed  # printed only when used
    if workers is None:  # a job of one task's rows is checked here: starting Ray would cost more than it saves
        workers = out.spec.resources.workers if out.index.num_rows > TASK_ROWS else 0
    if workers:
        from sdbatch.run.cluster import connect_ray

        connect_ray(address)
        report.checked_by = f"{plural(workers, 'Ray task')} at a time"

    final = out.index.final  # the index's own file is compared with the commits (the commits are not with themselves)
    spot = None
    if sample:  # drawn first, from a few columns, so one pass then reads exactly these rows and their shards' commits
        if progress:
            progress(f"drawing {plural(sample, 'random ok row')} from {out.index_source}")
        spot = RowSample(sample, seed, 1)
        for batch in out.index.batches(SAMPLE_COLUMNS):
            spot.add(batch)
        report.sample_seed, report.sampled = seed, spot.ids
    # --listing-only and --sample check the commits from their listing; --sample also reads its rows' shards'
    listed = listed_commits(storage) if final and (listing_only or sample) else None
    if not final or listing_only:
        commits = None
    elif spot is not None and listed is not None:
        commits = CommitSource(frozenset(s for s in spot.shards if s in listed), out.job.fingerprint, every_shard=False)
        report.notes.append(f"{INDEX_KEY} compared with the commits of the sample's {plural(len(commits.names), 'shard')} "
                            "only; every other commit listed, not read")
    else:
        commits = CommitSource(listed_commits(storage), out.job.fingerprint)
    checks = IndexChecks(out, commits)
    regenerated = RowSample(regenerate, seed, 0) if regenerate else None
    with _bar(bar, out.index.num_rows) as advance:
        def merge(found: ShardChecks) -> None:
            report.ok += found.ok
            report.read += found.read
            report.missing.extend(found.missing)
            report.mismatched.extend(found.mismatched)
            report.orphans.extend(found.orphans)
            if found.commits is not None:
                checks.add_commits(found.commits)
            advance(found.rows)

        if progress:
            progress(f"checking the objects of {out.index_source}")
        read_rows = spot.rows if spot is not None else [] if listing_only else None
        dispatch = ShardDispatch(out.layout, merge, workers=workers, rows=out.index.num_rows, threads=threads,
                                 read_rows=read_rows, commits=commits)
        for batch in out.index.batches(CHECK_COLUMNS):  # the index read once, a record batch at a time
            checks.add(batch)
            if regenerated is not None:
                regenerated.add(batch)
            dispatch.add(batch)
        dispatch.close()
    report.rows_in_index, report.rows_failed = checks.rows, checks.failed
    report.index_problems = checks.problems()
    if listed is not None:
        report.index_problems += commit_listing_problems(dispatch.shards, listed)
    report.duplicates, report.foreign = checks.duplicates, checks.foreign
    if progress:
        progress("listing the top-level folders for orphans")
    report.orphans.extend(sweep_orphans(storage, out.layout, dispatch.shards))
    report.orphans.sort()

    if regenerated is not None:
        bad = {i for i, _ in report.missing} | {i for i, _, _ in report.mismatched}
        _regenerate(out, report, [i for i in regenerated.ids if i not in bad], seed, endpoint_url, model, progress)
    return report


@contextmanager
def _bar(shown: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar of the index rows checked (on stderr), or nothing."""
    if not shown:
        yield lambda rows: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as ProgressBar

    with ProgressBar(TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TextColumn("rows checked"),
                     TimeElapsedColumn(), console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("rows", total=total)
        yield lambda rows: progress.advance(task, rows)


def _regenerate(out: JobOutput, report: VerifyReport, ids: list[str], seed: int, endpoint_url: str | None,
                model: str | None, progress: Callable[[str], None] | None) -> None:
    """Regenerate the rows ``ids`` (ok rows whose object checked good) and record what came out."""
    if not ids:
        return
    report.regenerate_seed = seed
    reproducer = Reproducer(out, endpoint_url=endpoint_url, model=model)
    found = out.index.rows(ids)
    # rows of one batch together, so each batch is generated once
    for rid in sorted(ids, key=lambda i: (found[i]["batch_id"] or "", found[i]["row"])):
        if progress:
            progress(f"regenerating {rid}")
        try:
            report.regenerated.append(reproducer.reproduce(rid))
        except (AuditError, StorageError, ValueError) as exc:
            report.regenerate_errors.append((rid, str(exc)))


def _rebuild_index(out: JobOutput, progress: Callable[[str], None] | None) -> str:
    """Rewrite a finished job's index from its commits (the driver's own merge)."""
    if not out.storage.exists(SUCCESS_KEY):
        raise AuditError(f"{out.storage.url}: the job is not finished (no {SUCCESS_KEY}); its driver writes the "
                         "index when every shard is committed — run the job's submit command again instead")
    if progress:
        progress("rebuilding the index from the commits")
    names = sorted(committed_shards(out.storage), key=int)  # job.json has no plan; the rows are checked
    summary = merge_index(out.storage, names, out.job.manifest.num_rows, _passthrough_types(out.storage, names),
                          out.job.fingerprint, DuplicateRule.of(out.spec.scoring))
    return f"rebuilt {INDEX_KEY} from {len(names)} commits ({summary.rows} rows)"


def _passthrough_types(storage: Storage, names: list[str]) -> dict[str, pa.DataType]:
    """The manifest's passthrough columns, from the commits' schemas (their Parquet footers)."""
    types: dict[str, pa.DataType] = {}
    for name in names:
        with storage.open_read(metadata_key(name)) as file:
            for f in pq.read_schema(file):
                if f.name not in INDEX_COLUMN_TYPES:
                    types.setdefault(f.name, f.type)
    return types
