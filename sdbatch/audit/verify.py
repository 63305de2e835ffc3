"""``verify``: every indexed object of a job's output is there and intact (its bytes hash to the
recorded sha256), the index agrees with the shards' commits, and — with ``--reproduce`` —
a sample of rows regenerates to the same bytes (``reproduce``, which imports torch only then)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sdbatch.audit.job_output import AuditError, JobOutput, open_job
from sdbatch.audit.reproduce import Reproducer, ReproduceResult
from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_OK
from sdbatch.output.commits import committed_shards
from sdbatch.output.documents import SUCCESS_KEY, JobRecord
from sdbatch.output.index import INDEX_KEY, committed_index, merge_index
from sdbatch.output.layout import PREFIXES
from sdbatch.storage.base import Storage, StorageError


@dataclass
class VerifyReport:
    url: str
    index_source: str
    finished: bool
    rows_total: int  # rows in the manifest (job.json)
    rows_in_index: int
    rows_failed: int  # status=failed rows: no object expected
    ok: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (id, key)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)  # (id, key, what)
    duplicates: list[str] = field(default_factory=list)  # ids indexed more than once
    orphans: list[str] = field(default_factory=list)  # objects no committed index row names
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (id, key): an object there that is not the row's
    index_problems: list[str] = field(default_factory=list)  # the index disagrees with job.json, manifest or commits
    notes: list[str] = field(default_factory=list)
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
            f"  ok         {self.ok} objects present with the recorded size and sha256",
        ]
        if self.rows_failed:
            lines.append(f"  failed     {self.rows_failed} rows have status=failed (no image; see the index's error column)")

        def section(title: str, items: list[str]) -> None:
            lines.append(f"  {title:<10} {len(items)}")
            lines.extend(f"    {x}" for x in items[:limit])
            if len(items) > limit:
                lines.append(f"    … and {len(items) - limit} more")

        lines.extend(f"  note       {n}" for n in self.notes)
        if self.index_problems:
            section("index", self.index_problems)
        if self.foreign:
            section("foreign", [f"{i}  {k}  (an object sdbatch did not write sits at this row's key; the row failed)"
                                for i, k in self.foreign])
        section("missing", [f"{i}  {k}" for i, k in self.missing])
        section("mismatched", [f"{i}  {k}  ({w})" for i, k, w in self.mismatched])
        if self.duplicates:
            section("duplicates", self.duplicates)
        section("orphans", self.orphans)
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
) -> VerifyReport:
    """Check the index against ``job.json``, the manifest (when reachable) and the commits,
    every index row's object (exists, recorded size, recorded sha256), list orphan objects,
    and optionally regenerate ``regenerate`` random ok rows (chosen with ``seed``; a random
    seed is drawn and reported when none is given) and report drift. ``rebuild_index``
    first rewrites a finished job's missing, corrupt or incomplete index from its commits."""
    out = open_job(storage, endpoint_url=endpoint_url)
    storage = out.storage
    rebuilt = None
    if rebuild_index:
        rebuilt = _rebuild_index(out, progress)
        out = open_job(storage)
    statuses = [r.get("status") for r in out.index]
    report = VerifyReport(
        url=storage.url,
        index_source=out.index_source,
        finished=out.finished,
        rows_total=out.job.manifest.num_rows,
        rows_in_index=len(out.index),
        rows_failed=sum(s != STATUS_OK for s in statuses),
    )
    if rebuilt:
        report.notes.append(rebuilt)
    report.index_problems = _index_problems(out, progress)
    report.foreign = [(r["id"], r["key"]) for r in out.index if r.get("status") != STATUS_OK and r.get("key")]
    seen: dict[str, int] = {}
    for r in out.index:
        seen[r["id"]] = seen.get(r["id"], 0) + 1
    report.duplicates = sorted(i for i, n in seen.items() if n > 1)
    ok_rows = [r for r in out.index if r.get("status") == STATUS_OK]
    if progress:
        progress(f"checking {len(ok_rows)} objects from {out.index_source}")
    checked = out.layout.check(ok_rows, threads)
    good = checked.good
    report.missing, report.mismatched, report.ok = checked.missing, checked.mismatched, len(good)
    named = out.layout.objects([r["key"] for r in ok_rows])
    listed = [key for prefix in PREFIXES for key in storage.list(prefix)]
    report.orphans = sorted([k for k in listed if k not in named] + checked.orphan_members)

    if regenerate > 0 and good:
        report.regenerate_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        chosen = random.Random(report.regenerate_seed).sample(sorted(r["id"] for r in good), min(regenerate, len(good)))
        reproducer = Reproducer(out, endpoint_url=endpoint_url, model=model)
        # rows of one batch together, so each batch is generated once
        order = {rid: (reproducer.by_id[rid]["batch_id"], reproducer.by_id[rid]["row"]) for rid in chosen}
        for rid in sorted(chosen, key=order.__getitem__):
            if progress:
                progress(f"regenerating {rid}")
            try:
                report.regenerated.append(reproducer.reproduce(rid))
            except (AuditError, StorageError, ValueError) as exc:
                report.regenerate_errors.append((rid, str(exc)))
    return report


def _manifest_ids(job: JobRecord) -> tuple[list[str] | None, str | None]:
    """The ids of the job's manifest in row order — or, when it is unreachable or changed since
    the job pinned it, None and the problem (the index cannot be checked against it)."""
    from sdbatch.data.row import default_row_id
    from sdbatch.manifest.reader import iter_row_batches
    from sdbatch.manifest.sources import ManifestError, open_manifest

    unchecked = f"the index's ids were not checked against the job's manifest {job.manifest.source}"
    try:
        manifest = open_manifest(job.manifest.source)
        if manifest.fingerprint != job.manifest.fingerprint:
            return None, (f"{unchecked}: it changed since the job pinned it (fingerprint {manifest.fingerprint}, "
                          f"job.json {job.manifest.fingerprint}); restore it to check the index")
        if "id" not in manifest.columns:
            return [default_row_id(i) for i in range(manifest.num_rows)], None
        return [v for rb in iter_row_batches(manifest, columns=["id"]) for v in rb.column(0).to_pylist()], None
    except (ManifestError, StorageError, OSError) as exc:
        return None, f"{unchecked}: cannot read it ({exc}); run verify where it is reachable"


def _index_problems(out: JobOutput, progress: Callable[[str], None] | None) -> list[str]:
    """How the index disagrees with job.json (row count), the manifest (ids, when reachable)
    and the commits (the rows they hold)."""
    problems = [out.index_error] if out.index_error else []
    ids = [r["id"] for r in out.index]
    total = out.job.manifest.num_rows
    if out.finished and len(ids) != total:
        problems.append(f"{INDEX_KEY} holds {len(ids)} rows, the job's manifest {total} (job.json); "
                        "rebuild it with --rebuild-index")
    if out.index_source == INDEX_KEY:
        if progress:
            progress("comparing the index with the commits")
        commits, _ = committed_index(out.storage, out.job.fingerprint)
        committed = {r["id"]: (r["key"], r["sha256"], r["status"]) for r in commits.to_pylist()} if commits.num_rows else {}
        indexed = {r["id"]: (r["key"], r["sha256"], r["status"]) for r in out.index}
        lost = sorted(set(committed) - set(indexed))
        if lost:
            problems.append(f"{len(lost)} committed rows are not in {INDEX_KEY} (e.g. {', '.join(lost[:5])}); "
                            "rebuild it with --rebuild-index")
        differ = sorted(i for i in set(committed) & set(indexed) if committed[i] != indexed[i])
        if differ:
            problems.append(f"{len(differ)} rows of {INDEX_KEY} differ from their commit (e.g. {', '.join(differ[:5])}); "
                            "rebuild it with --rebuild-index")
        unknown = sorted(set(indexed) - set(committed))
        if unknown:
            problems.append(f"{len(unknown)} rows of {INDEX_KEY} are in no commit (e.g. {', '.join(unknown[:5])})")
    expected, unchecked = _manifest_ids(out.job)
    if expected is None:
        assert unchecked is not None  # no ids: the problem says why
        return [*problems, unchecked]
    present = set(ids)
    absent = [i for i in expected if i not in present] if out.finished else []
    strangers = sorted(present - set(expected))
    if absent:
        problems.append(f"{len(absent)} manifest rows are not in the index (e.g. {', '.join(absent[:5])})")
    if strangers:
        problems.append(f"{len(strangers)} index rows are not in the manifest (e.g. {', '.join(strangers[:5])})")
    return problems


def _rebuild_index(out: JobOutput, progress: Callable[[str], None] | None) -> str:
    """Rewrite a finished job's index from its commits (the driver's own merge)."""
    if not out.storage.exists(SUCCESS_KEY):
        raise AuditError(f"{out.storage.url}: the job is not finished (no {SUCCESS_KEY}); its driver writes the "
                         "index when every shard is committed — run the job's submit command again instead")
    if progress:
        progress("rebuilding the index from the commits")
    commits, merged = committed_index(out.storage, out.job.fingerprint)
    passthrough = {f.name: f.type for f in commits.schema if f.name not in INDEX_COLUMN_TYPES}
    names = sorted(committed_shards(out.storage), key=int)  # job.json has no plan; the rows are checked
    summary = merge_index(out.storage, names, out.job.manifest.num_rows, passthrough, out.job.fingerprint,
                          out.spec.scoring.duplicate_max_distance)
    return f"rebuilt {INDEX_KEY} from {merged} commits ({summary.rows} rows)"
