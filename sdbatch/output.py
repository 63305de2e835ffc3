"""The output layout and commit protocol (DESIGN §4).

    OUT/_sdbatch/job.json        the job record, written first
    OUT/_sdbatch/lock.json       the running driver's lease
    OUT/_sdbatch/progress.json   progress snapshot
    OUT/images/NNNNN/<id>.<ext>  format=files        | OUT/shards/NNNNN.tar  format=webdataset
    OUT/metadata/NNNNN.parquet   the shard index — written last: it IS the shard's commit
    OUT/index.parquet            all shard indexes merged, once every shard is committed
    OUT/_SUCCESS                 JSON summary, written last of all

A shard is done exactly when its metadata file exists and carries this job's fingerprint (in
its Parquet key-value metadata); readers trust such commits, never a listing of images/. A new
job claims only an OUT that holds no images, shards or commits it did not write, and
``--new-run`` deletes only what the old job's commits and index name — an image object only
when it holds the bytes an ok row recorded (read and hashed first). Where the images go
(files or webdataset tars) is ``layout``'s. Everything here works on any ``Storage`` and needs
no Ray.
"""

from __future__ import annotations

import logging
import io
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
import sdbatch
from sdbatch.data.index import index_schema, STATUS_FAILED, STATUS_OK
from sdbatch.documents import FailedRow, JOB_KEY, JobRecord, LoraPin, ManifestPin, ModelPin, PROGRESS_KEY, read_json, Success, SUCCESS_KEY, write_json
from sdbatch.errors import BadInput, JobFailed
from sdbatch.layout import IMAGES_PREFIX, Layout, layout_for, object_key, TARS_PREFIX
from sdbatch.manifest import Manifest
from sdbatch.plan import shard_name
from sdbatch.quality import mark_duplicates
from sdbatch.spec import fingerprint, JobSpec
from sdbatch.storage.base import NotFound, Storage

log = logging.getLogger("sdbatch.output")


METADATA_PREFIX = "metadata/"


INDEX_KEY = "index.parquet"


REPORT_KEY = "report.html"


#: Parquet key-value metadata of every commit (and of the index): the job that wrote it
FINGERPRINT_META = b"sdbatch.job_fingerprint"


class OutputMismatch(BadInput, ValueError):
    """OUT already holds a different job, or objects this job did not write."""


class ForeignCommit(OutputMismatch):
    """A commit (metadata/NNNNN.parquet) that does not carry this job's fingerprint."""


def metadata_key(shard_name: str) -> str:
    return f"{METADATA_PREFIX}{shard_name}.parquet"


def committed_shards(storage: Storage, num_shards: int | None = None) -> set[str]:
    """Names of committed shards, from a listing of metadata/ only. Only a name the plan makes
    (``plan.shard_name``: ``00000`` … below ``num_shards`` when known) is a commit: another file
    there (a ``summary.parquet`` some tool left, a copy at ``0.parquet``) is not a shard."""
    names = (key[len(METADATA_PREFIX) : -len(".parquet")] for key in storage.list(METADATA_PREFIX) if key.endswith(".parquet"))
    return {name for name in names if name.isascii() and name.isdigit() and shard_name(int(name)) == name
            and (num_shards is None or int(name) < num_shards)}


def table_to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def records_to_parquet(records: list[dict[str, Any]], schema: pa.Schema, job_fingerprint: str) -> bytes:
    """A shard index's bytes, typed by ``schema`` (``index_schema``): a column that is null
    throughout one shard (``strength`` in a text-to-image shard) still has its declared type;
    stamped with the fingerprint of the job that wrote it."""
    undeclared = sorted(set().union(*records) - set(schema.names))
    if undeclared:  # a new index column must be declared in INDEX_COLUMN_TYPES, not dropped
        raise ValueError(f"index rows carry columns the index schema does not declare: {', '.join(undeclared)}")
    stamped = schema.with_metadata({FINGERPRINT_META: job_fingerprint.encode()})
    return table_to_parquet(pa.Table.from_pylist(records, schema=stamped))


@dataclass(frozen=True)
class Commit:
    """A shard's committed index rows and the storage tag of the commit they were read from."""

    records: list[dict[str, Any]]
    tag: str


def read_commit(storage: Storage, shard_name: str, job_fingerprint: str) -> Commit:
    """A commit and its tag, only if it carries ``job_fingerprint`` (ForeignCommit otherwise;
    CorruptCommit if it is not readable Parquet)."""
    data, tag = storage.get_tagged(metadata_key(shard_name))
    return Commit(_own_commit(storage, shard_name, data, job_fingerprint).to_pylist(), tag)


def commit_shard(
    storage: Storage, shard_name: str, records: list[dict[str, Any]], schema: pa.Schema, job_fingerprint: str,
    replacing: Commit | None = None,
) -> bool:
    """Write the shard index — the commit — typed by ``schema`` and stamped with
    ``job_fingerprint``. A new shard's is create-once: False if an earlier attempt of this job
    had already committed it (its index stays, ours is dropped; ForeignCommit if the commit
    there is not this job's). ``replacing`` (--retry-failed) is the commit read before its
    failed rows were regenerated: it is replaced by compare-and-swap, False if it changed
    meanwhile (a concurrent attempt replaced it first; that one stays)."""
    data = records_to_parquet(records, schema, job_fingerprint)
    if replacing is None:
        created = storage.put_new(metadata_key(shard_name), data).created
        if not created:
            read_shard_index(storage, shard_name, job_fingerprint)
        return created
    return storage.replace_if(metadata_key(shard_name), data, replacing.tag) is not None


class CorruptCommit(JobFailed):
    """A shard's commit that is not readable Parquet (truncated, overwritten by another tool)."""

    def __init__(self, shard_name: str, cause: Exception):
        super().__init__(f"{metadata_key(shard_name)} is not a readable shard index ({type(cause).__name__}: "
                         f"{cause}): shard {shard_name} is treated as uncommitted")
        self.shard_name = shard_name


def _own_commit(storage: Storage, shard_name: str, data: bytes, job_fingerprint: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorruptCommit(shard_name, exc) from None
    found = _stamp(table)
    if found != job_fingerprint:
        key = metadata_key(shard_name)
        raise ForeignCommit(
            f"{storage.url}/{key} was not written by this job (it carries fingerprint {found or 'none'!r}, "
            f"the job is {job_fingerprint}); sdbatch trusts only its own commits. Delete it (or choose another "
            "--out) and run the same command again"
        )
    return table


def read_shard_index(storage: Storage, shard_name: str, job_fingerprint: str) -> pa.Table:
    """A commit, only if it carries ``job_fingerprint`` (ForeignCommit otherwise; CorruptCommit
    if it is not readable Parquet)."""
    return _own_commit(storage, shard_name, storage.get(metadata_key(shard_name)), job_fingerprint)


#: Shard indexes read ahead of the writer while merging, and the rows gathered into one
#: Parquet row group: together they bound the merge's memory.
MERGE_READ_AHEAD = 8


MERGE_ROW_GROUP_ROWS = 65_536


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order and types. Linear in the columns: a
    wide manifest's labels are thousands of them (``limits.max_columns``)."""
    present = dict(zip(table.column_names, table.columns))  # ``table.column_names`` is a new list per call
    columns = [present[f.name].cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema).sort_by("row")


def _write_row_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> None:
    table = pa.concat_tables(tables)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


@dataclass(frozen=True)
class IndexSummary:
    rows: int
    rows_failed: int
    first_failed: list[FailedRow]  # the first FAILED_ROWS_SHOWN failed rows
    duplicates: int = 0


FAILED_ROWS_SHOWN = 10  # failed rows listed at the end of a job and by `sdbatch status`


def failed_rows_text(failed_rows: list[FailedRow]) -> str:
    """The listing of failed rows the console and ``sdbatch status`` show, one per line."""
    return "\n".join(f"  {row.id}: {row.error}" for row in failed_rows)


class _RowCoverage:
    """The manifest rows the commits read so far hold, one bit per row: an index is written
    only of exactly the manifest's rows, each once, from a commit of every shard read."""

    SHOWN = 5  # rows and shards named per problem

    def __init__(self, num_rows: int):
        self.seen = np.zeros(num_rows, dtype=bool)
        self.problems: list[str] = []
        self.absent: list[str] = []

    def add(self, name: str, table: pa.Table) -> None:
        rows = table.column("row").to_numpy(zero_copy_only=False)
        inside = (rows >= 0) & (rows < len(self.seen))
        first = np.zeros(len(rows), dtype=bool)
        first[np.unique(rows, return_index=True)[1]] = True  # a row twice in one commit is extra too
        extra = ~inside | ~first
        extra[inside & first] = self.seen[rows[inside & first]]
        self.seen[rows[inside]] = True
        if extra.any():
            ids = table.column("id").filter(pa.array(extra)).to_pylist()
            self.problems.append(f"{metadata_key(name)} holds {len(ids)} rows that are not its own "
                                 f"(ids {self._shown(ids)}: outside the manifest or in another commit too)")

    def missing_commit(self, name: str) -> None:
        self.absent.append(name)

    def check(self) -> None:
        """JobFailed naming what is missing or extra, if anything is."""
        problems = list(self.problems)
        if self.absent:
            problems.insert(0, f"no commit of {len(self.absent)} planned shards "
                               f"({self._shown([metadata_key(n) for n in self.absent])} missing)")
        unseen = np.flatnonzero(~self.seen)
        if len(unseen):
            problems.append(f"{len(unseen)} manifest rows are in no commit (rows {self._shown(unseen.tolist())})")
        if problems:
            raise JobFailed(f"the job is not finished: its commits do not hold exactly the manifest's "
                            f"{len(self.seen)} rows, each once: {'; '.join(problems)}. {INDEX_KEY} and {SUCCESS_KEY} "
                            "were not written; move away a commit that is not its shard's, then run the same command "
                            "again: shards without a commit are generated again")

    def _shown(self, items: list[Any]) -> str:
        return ", ".join(map(str, items[:self.SHOWN])) + (f" … (+{len(items) - self.SHOWN} more)" if len(items) > self.SHOWN else "")


def _read_planned_commit(storage: Storage, name: str, job_fingerprint: str) -> pa.Table | None:
    """Shard ``name``'s commit (None: it has none). A file there that is not a readable shard
    index was not written by sdbatch (its commits are written whole, create-once): refused,
    never deleted."""
    try:
        return read_shard_index(storage, name, job_fingerprint)
    except NotFound:
        return None
    except CorruptCommit:
        raise ForeignCommit(
            f"{storage.url}/{metadata_key(name)} is not a shard index sdbatch wrote (not readable Parquet); it is "
            f"not counted as shard {name}'s commit, and sdbatch never deletes a file it did not write. Move it "
            "away, then run the same command again: that shard is generated again"
        ) from None


def merge_index(
    storage: Storage, shard_names: list[str], num_rows: int, passthrough_types: dict[str, pa.DataType],
    job_fingerprint: str, duplicate_max_distance: int = 0,
) -> IndexSummary:
    """Write the commits of ``shard_names`` (the plan's shards, in order), in row order, as
    ``index.parquet``, one shard at a time through a local temporary file: the driver holds
    ``MERGE_READ_AHEAD`` shard indexes, never the whole index. Nothing is written unless every
    shard has its commit and the commits hold exactly rows 0 … ``num_rows`` - 1, each once
    (``JobFailed`` naming what is missing or extra). ``duplicate_of`` is then filled in from
    that file (``quality.mark_duplicates``, bounded memory too). Idempotent: an interrupted
    merge is simply redone."""
    schema = index_schema(passthrough_types).with_metadata({FINGERPRINT_META: job_fingerprint.encode()})
    rows = failed = 0
    first_failed: list[FailedRow] = []
    coverage = _RowCoverage(num_rows)
    with tempfile.TemporaryDirectory(prefix="sdbatch-index-") as tmp, ThreadPoolExecutor(MERGE_READ_AHEAD) as pool:
        path = Path(tmp) / INDEX_KEY
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            group: list[pa.Table] = []
            for start in range(0, len(shard_names), MERGE_READ_AHEAD):
                names = shard_names[start:start + MERGE_READ_AHEAD]
                read = partial(_read_planned_commit, storage, job_fingerprint=job_fingerprint)
                for name, table in zip(names, pool.map(read, names)):
                    if table is None:
                        coverage.missing_commit(name)
                        continue
                    coverage.add(name, table)
                    group.append(_conform(table, schema))
                    rows += table.num_rows
                    failures = table.filter(pc.equal(table.column("status"), STATUS_FAILED))
                    failed += failures.num_rows
                    shown = failures.select(["id", "error"]).slice(0, FAILED_ROWS_SHOWN - len(first_failed))
                    first_failed += [FailedRow(**row) for row in shown.to_pylist()]
                    if sum(t.num_rows for t in group) >= MERGE_ROW_GROUP_ROWS:
                        _write_row_group(writer, group)
                        group = []
            coverage.check()
            if group or not rows:
                _write_row_group(writer, group or [schema.empty_table()])
        marked = Path(tmp) / f"marked-{INDEX_KEY}"
        duplicates = mark_duplicates(path, marked, duplicate_max_distance)
        storage.put_file(INDEX_KEY, marked)
    return IndexSummary(rows=rows, rows_failed=failed, first_failed=first_failed, duplicates=duplicates)


def committed_index(storage: Storage, job_fingerprint: str) -> tuple[pa.Table, int]:
    """The merge of every commit (each checked to carry ``job_fingerprint``), in row order,
    and how many commits that is."""
    names = sorted(committed_shards(storage), key=int)
    tables = [read_shard_index(storage, name, job_fingerprint) for name in names]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return (table.sort_by("row") if "row" in table.column_names else table), len(names)


def read_index(storage: Storage, job_fingerprint: str) -> tuple[pa.Table, int | None]:
    """The final index if written and stamped with ``job_fingerprint`` (and None), else the
    merge of what is committed so far (not written) and how many commits that is."""
    try:
        table = pq.read_table(io.BytesIO(storage.get(INDEX_KEY)))
    except NotFound:
        pass
    except (pa.ArrowInvalid, OSError) as exc:  # a merge cut short: the commits still hold every row
        log.warning("%s is not readable Parquet (%s: %s): reading the shard commits instead; rerun "
                    "`sdbatch submit` to rewrite it", INDEX_KEY, type(exc).__name__, exc)
    else:
        if _stamp(table) == job_fingerprint:
            return table, None
        log.warning("%s does not carry this job's fingerprint: reading the shard commits instead", INDEX_KEY)
    return committed_index(storage, job_fingerprint)


def job_record(spec: JobSpec, manifest: Manifest, model_fingerprint: str | None,
               lora_sha256: dict[str, str] | None = None, refiner_pin: str | None = None) -> JobRecord:
    """``_sdbatch/job.json``. Its fingerprint covers everything that decides the images and
    where rows land — spec settings, manifest content, model weights, the refiner's pin, LoRA
    adapters' bytes — so a resume with any of them changed is refused rather than mixing two
    jobs in one OUT."""
    lora_sha256 = lora_sha256 or {}
    return JobRecord(
        fingerprint=fingerprint({
            "spec": spec.fingerprint_fields(), "manifest": manifest.fingerprint,
            "rows": manifest.num_rows, "model": model_fingerprint,
            **({"loras": lora_sha256} if lora_sha256 else {}),
            **({"refiner": refiner_pin} if refiner_pin else {}),
        }),
        loras={name: LoraPin(path=spec.loras[name], sha256=sha) for name, sha in lora_sha256.items()},
        refiner=ModelPin(name=spec.model.refiner, fingerprint=refiner_pin) if refiner_pin else None,
        spec=spec.model_dump(mode="json"),
        manifest=ManifestPin(source=manifest.source, fingerprint=manifest.fingerprint, num_rows=manifest.num_rows,
                             files=list(manifest.files), base_dir=manifest.base_dir),
        model=ModelPin(name=spec.model.name, fingerprint=model_fingerprint),
        sdbatch_version=sdbatch.__version__,
        created_at=datetime.now().astimezone().isoformat(timespec="seconds"),
    )


#: What a job may write under OUT besides its state files: a new job claims an OUT only if
#: none of these holds an object (sdbatch trusts nothing in OUT it did not write).
JOB_OUTPUT_PARTS = (METADATA_PREFIX, IMAGES_PREFIX, TARS_PREFIX, INDEX_KEY, SUCCESS_KEY, REPORT_KEY)


#: ``--new-run``'s plan: the old job's objects, written before the first delete so an
#: interrupted clear can be finished by running ``--new-run`` again.
CLEAR_KEY = "_sdbatch/clear.json"


#: The order of deletion: commits first and job.json last, so an interrupted clear leaves a
#: state of the old job that still resumes (job.json names it; its uncommitted shards are
#: simply redone), and a new job is claimed only once no image of the old one is left.
_DELETE_ORDER = (
    METADATA_PREFIX, INDEX_KEY, SUCCESS_KEY, REPORT_KEY, IMAGES_PREFIX, TARS_PREFIX, PROGRESS_KEY, JOB_KEY,
)


def _stamped(data: bytes, job_fingerprint: str) -> pa.Table | None:
    """The Parquet table in ``data`` if it carries ``job_fingerprint``, else None."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError):
        return None
    return table if _stamp(table) == job_fingerprint else None


def _stamp(table: pa.Table) -> str:
    """The job fingerprint a commit or index carries ('' for none)."""
    return (table.schema.metadata or {}).get(FINGERPRINT_META, b"").decode()


#: How many image objects ``--new-run`` reads and hashes at once (a tar counts as one).
CLEAR_CHECK_OBJECTS = 64


def _objects_written(layout: Layout, table: pa.Table, seen: set[str]) -> set[str]:
    """The objects a commit or index names for its ok rows that hold exactly the bytes those
    rows recorded (a tar: every member an ok row's, each with its recorded bytes), read and
    hashed ``CLEAR_CHECK_OBJECTS`` at a time; a failed row's key (a foreign object it could not
    replace) and any other bytes are never the job's. Objects in ``seen`` were judged already."""
    if "key" not in table.column_names:
        return set()
    by_object: dict[str, list[dict[str, Any]]] = {}
    for entry in table.filter(pc.equal(table.column("status"), STATUS_OK)).select(
            ["id", "key", "bytes", "sha256"]).to_pylist():
        if object_key(entry["key"]) not in seen:
            by_object.setdefault(object_key(entry["key"]), []).append(entry)
    seen |= set(by_object)
    objects = list(by_object)
    written: set[str] = set()
    for start in range(0, len(objects), CLEAR_CHECK_OBJECTS):
        chunk = objects[start:start + CLEAR_CHECK_OBJECTS]
        checked = layout.check([e for obj in chunk for e in by_object[obj]], threads=4)
        other = {object_key(k) for _, k in checked.missing} | {object_key(k) for _, k, _ in checked.mismatched}
        other |= {object_key(member) for member in checked.orphan_members}
        written |= {object_key(e["key"]) for e in checked.good} - other
    return written


def _old_job_objects(storage: Storage, job: JobRecord) -> set[str]:
    """Every object ``job`` owns: its commits, the images they and its index name that hold the
    bytes it recorded, its index and ``_SUCCESS``; its state files under ``_sdbatch/``."""
    owned = {JOB_KEY, PROGRESS_KEY}
    try:  # and the report it writes at the end of every run, if it is that job's
        if is_own_report(storage.get(REPORT_KEY), job.fingerprint):
            owned.add(REPORT_KEY)
    except NotFound:
        pass
    layout, seen = layout_for(storage, job.job_spec.output), set()
    for key in storage.list(METADATA_PREFIX):
        table = _stamped(storage.get(key), job.fingerprint)
        if table is not None:
            owned |= {key} | _objects_written(layout, table, seen)
    try:
        index = _stamped(storage.get(INDEX_KEY), job.fingerprint)
        if index is not None:
            owned |= {INDEX_KEY} | _objects_written(layout, index, seen)
    except NotFound:
        pass
    success = Success.read(storage)
    if success is not None and success.fingerprint == job.fingerprint:
        owned.add(SUCCESS_KEY)
    return owned


def report_mark(job_fingerprint: str) -> str:
    """The tag in the head of the ``report.html`` sdbatch writes, naming its job: the only
    ``report.html`` sdbatch replaces or deletes is one that carries its job's mark."""
    return f'<meta name="sdbatch-job" content="{job_fingerprint}">'


def is_own_report(data: bytes, job_fingerprint: str) -> bool:
    return report_mark(job_fingerprint).encode() in data  # a page's own text is escaped: it cannot forge one


def put_report(storage: Storage, page: bytes, job_fingerprint: str) -> None:
    """Store ``page`` as ``report.html``: create-once, or by compare-and-swap in place of this
    job's own report. OutputMismatch when the one there is not (a user's page, another job's)."""
    if storage.put_new(REPORT_KEY, page).created:
        return
    data, tag = storage.get_tagged(REPORT_KEY)
    if not is_own_report(data, job_fingerprint):
        raise OutputMismatch(
            f"{storage.url}/{REPORT_KEY} is not this job's report (sdbatch marks its own with the job's fingerprint, "
            f"{job_fingerprint}), and sdbatch never overwrites a file it did not write: move it away, then run "
            "`sdbatch report OUT`"
        )
    if storage.replace_if(REPORT_KEY, page, tag) is None:
        raise OutputMismatch(f"{storage.url}/{REPORT_KEY} changed while this report was written (another writer "
                             "there?): run `sdbatch report OUT` again")


def clear_job(storage: Storage) -> int:
    """``--new-run``: delete the job OUT holds — only the objects its commits and index name
    holding the bytes it recorded, and its own state files; never a file of the user's, never an
    object no commit of that job names or whose bytes are not the ones it wrote. OutputMismatch
    when OUT holds no job. Returns how many objects were deleted."""
    old = JobRecord.read(storage)
    if old is None:
        raise OutputMismatch(
            f"--new-run: {storage.url} holds no sdbatch job (no {JOB_KEY}), so there is nothing sdbatch may delete; "
            "choose an empty --out, or move the files there away yourself"
        )
    planned = read_json(storage, CLEAR_KEY) or {}
    owned = _old_job_objects(storage, old)
    if planned.get("fingerprint") == old.fingerprint:
        owned |= set(planned["keys"])
    write_json(storage, CLEAR_KEY, {"fingerprint": old.fingerprint, "keys": sorted(owned)})
    deleted = 0
    for part in _DELETE_ORDER:
        keys = sorted(k for k in owned if k.startswith(part)) if part.endswith("/") else [part] if part in owned else []
        storage.delete_many(keys)
        deleted += len(keys)
    storage.delete(CLEAR_KEY)
    return deleted


def refuse_foreign_objects(storage: Storage) -> None:
    """A new job (no job.json yet) writes only into an OUT whose job parts are empty."""
    found = [key for part in JOB_OUTPUT_PARTS
             for key in (storage.list(part) if part.endswith("/") else [part] if storage.exists(part) else [])]
    if found:
        shown = ", ".join(found[:5]) + (f" … (+{len(found) - 5} more)" if len(found) > 5 else "")
        raise OutputMismatch(
            f"{storage.url} holds {len(found)} objects that no sdbatch job there wrote ({shown}); a new job "
            f"writes only into an OUT without {', '.join(JOB_OUTPUT_PARTS)} of its own. Choose an empty --out, "
            "or move those objects away"
        )


def claim_job(storage: Storage, job: JobRecord) -> bool:
    """Under the job lock: write job.json (create-once) on an OUT that holds none, checking that
    the create won; on an OUT that has one, its fingerprint must be this job's. Returns True
    when resuming an existing job."""
    existing = JobRecord.read(storage)
    if existing is None:
        refuse_foreign_objects(storage)
        if storage.put_new(JOB_KEY, job.to_bytes()).created:
            return False
        existing = JobRecord.read(storage)  # another driver's create won
        if existing is None:
            raise OutputMismatch(f"{storage.url}/{JOB_KEY} appeared and vanished while this job claimed OUT: is "
                                 "another tool writing there? Run the same command again")
    if existing.fingerprint != job.fingerprint:
        raise OutputMismatch(
            f"{storage.url} already holds a different job: {what_changed(existing, job)}. Resume only with the "
            "same manifest, settings and model, choose a new --out, or pass --new-run to delete that job's "
            "output and start this one there."
        )
    return True


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def what_changed(existing: JobRecord, job: JobRecord) -> str:
    """What differs between the job OUT holds and ``job``: manifest, spec keys, model, refiner, LoRAs."""
    changes = []
    old_m, new_m = existing.manifest, job.manifest
    if (old_m.fingerprint, old_m.num_rows) != (new_m.fingerprint, new_m.num_rows):
        changes.append(f"the manifest ({old_m.source!r}, {old_m.num_rows} rows, fingerprint {old_m.fingerprint} → "
                       f"{new_m.source!r}, {new_m.num_rows} rows, fingerprint {new_m.fingerprint})")
    try:
        old_spec = _flat(existing.job_spec.fingerprint_fields())
    except ValueError:  # a spec of another sdbatch version
        old_spec = {}
    new_spec = _flat(job.job_spec.fingerprint_fields())
    keys = [k for k in new_spec if old_spec.get(k) != new_spec[k]]
    if keys:
        changes.append("the settings " + ", ".join(f"{k} ({old_spec.get(k)!r} → {new_spec[k]!r})" for k in keys))
    for kind in ("model", "refiner"):  # a job may have no refiner, on either side
        old, new = getattr(existing, kind), getattr(job, kind)
        old_pin, new_pin = old and old.fingerprint, new and new.fingerprint
        if old_pin != new_pin:
            changes.append(f"the {kind} {(new or old).name!r} (pinned {old_pin} when that job was submitted, "
                           f"now {new_pin})")
    for name in sorted(set(existing.loras) | set(job.loras)):
        old, new = existing.loras.get(name), job.loras.get(name)
        if (old and old.sha256) != (new and new.sha256):
            changes.append(f"the LoRA {name}={(new or old).path} (sha256 {str(old and old.sha256)[:12]}… when that "
                           f"job was submitted, now {str(new and new.sha256)[:12]}…)")
    return "; ".join(changes) or f"job fingerprint {existing.fingerprint} there, {job.fingerprint} here"
