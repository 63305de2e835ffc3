"""A job's claim on OUT and its clear: the job record (``job.json``) written first and compared on
every resume (``what_changed`` names what differs), a foreign OUT refused, ``--new-run``'s
deletion of only what the old job's commits and index name, and ``report.html``'s mark of
ownership."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import sdbatch
from sdbatch.data.index import JOB_KEY, STATUS_OK
from sdbatch.manifest.sources import Manifest
from sdbatch.output.commits import METADATA_PREFIX, OutputMismatch, stamped_table
from sdbatch.output.documents import (
    PROGRESS_KEY,
    SUCCESS_KEY,
    JobRecord,
    LoraPin,
    ManifestPin,
    ModelPin,
    Success,
    read_json,
    write_json,
)
from sdbatch.output.index import INDEX_KEY, open_index
from sdbatch.output.layout import IMAGES_PREFIX, TARS_PREFIX, Layout, layout_for, object_key
from sdbatch.spec import JobSpec, fingerprint
from sdbatch.storage.base import NotFound, Storage

REPORT_KEY = "report.html"


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


#: ``--new-run``'s plan, written whole before the first delete so that an interrupted clear is
#: finished by running ``--new-run`` again: the old job's objects in parts of at most
#: ``CLEAR_PART_KEYS`` keys, a sequence per kind of object (``_DELETE_ORDER``), then
#: ``CLEAR_PLAN_KEY`` (the job's fingerprint and each kind's number of parts), which says the
#: plan is complete. Neither writing nor carrying out the plan holds more than a part.
CLEAR_PREFIX = "_sdbatch/clear/"
CLEAR_PLAN_KEY = f"{CLEAR_PREFIX}plan.json"
CLEAR_PART_KEYS = 10_000
#: The clear plan of an sdbatch from before the parts: one file naming every object of the old job.
LEGACY_CLEAR_KEY = "_sdbatch/clear.json"


#: The order of deletion: commits first and job.json last, so an interrupted clear leaves a
#: state of the old job that still resumes (job.json names it; its uncommitted shards are
#: simply redone), and a new job is claimed only once no image of the old one is left.
_DELETE_ORDER = (
    METADATA_PREFIX, INDEX_KEY, SUCCESS_KEY, REPORT_KEY, IMAGES_PREFIX, TARS_PREFIX, PROGRESS_KEY, JOB_KEY,
)


#: How many image objects ``--new-run`` reads and hashes at once (a tar counts as one).
CLEAR_CHECK_OBJECTS = 64


#: The index columns that say which objects an index or commit names for its ok rows.
_OBJECT_COLUMNS = ["id", "status", "key", "bytes", "sha256"]


def _objects_written(layout: Layout, batch: pa.RecordBatch, skip: set[str]) -> tuple[set[str], set[str]]:
    """The objects a commit's or index's record ``batch`` names for its ok rows (but those in
    ``skip``, judged already), and of those the ones that hold exactly the bytes those rows
    recorded (a tar: every member an ok row's, each with its recorded bytes), read and hashed
    ``CLEAR_CHECK_OBJECTS`` at a time; a failed row's key (a foreign object it could not
    replace) and any other bytes are never the job's."""
    by_object: dict[str, list[dict[str, Any]]] = {}
    ok = batch.filter(pc.fill_null(pc.equal(batch.column("status"), STATUS_OK), False))
    for entry in ok.select(["id", "key", "bytes", "sha256"]).to_pylist():
        if object_key(entry["key"]) not in skip:
            by_object.setdefault(object_key(entry["key"]), []).append(entry)
    objects = list(by_object)
    written: set[str] = set()
    for start in range(0, len(objects), CLEAR_CHECK_OBJECTS):
        chunk = objects[start:start + CLEAR_CHECK_OBJECTS]
        checked = layout.check([e for obj in chunk for e in by_object[obj]], threads=4)
        other = {object_key(k) for _, k in checked.missing} | {object_key(k) for _, k, _ in checked.mismatched}
        other |= {object_key(member) for member in checked.orphan_members}
        written |= {object_key(e["key"]) for e in checked.good} - other
    return set(by_object), written


def _old_job_objects(storage: Storage, job: JobRecord) -> Iterator[str]:
    """Every object ``job`` owns, a commit's or an index batch's at a time: its commits, the
    images they and its index name that hold the bytes it recorded, its index and
    ``_SUCCESS``; its state files under ``_sdbatch/``. What it holds between them is a bit per
    shard (whose commit was judged), not a key per object."""
    yield from (JOB_KEY, PROGRESS_KEY)
    try:  # and the report it writes at the end of every run, if it is that job's
        if is_own_report(storage.get(REPORT_KEY), job.fingerprint):
            yield REPORT_KEY
    except NotFound:
        pass
    layout = layout_for(storage, job.job_spec.output)
    judged: list[bool] = []  # by shard number: its commit's objects were judged
    for key in storage.list(METADATA_PREFIX):
        table = stamped_table(storage.get(key), job.fingerprint)  # one shard's rows
        if table is not None:
            yield key
            number = int(key[len(METADATA_PREFIX):].split(".")[0])
            judged += [False] * (number + 1 - len(judged))
            judged[number] = True
            if "key" in table.column_names:
                for batch in table.select(_OBJECT_COLUMNS).to_batches():
                    yield from _objects_written(layout, batch, set())[1]
    index = open_index(storage, job.fingerprint)
    if index.final:  # a record batch at a time; the rows of a shard whose commit was judged are skipped
        yield INDEX_KEY
        shards_judged, previous = np.array(judged + [False], dtype=bool), set[str]()
        for batch in index.batches([*_OBJECT_COLUMNS, "shard"]):
            numbers = np.minimum(pc.cast(batch.column("shard"), pa.int64()).to_numpy(), len(shards_judged) - 1)
            unjudged = batch.filter(pa.array(~shards_judged[numbers]))
            previous, written = _objects_written(layout, unjudged, previous)  # a tar may reach into the next batch
            yield from written
    success = Success.read(storage)
    if success is not None and success.fingerprint == job.fingerprint:
        yield SUCCESS_KEY


def _kind(key: str) -> int:
    """Which of ``_DELETE_ORDER`` a key of the old job is."""
    return next(i for i, part in enumerate(_DELETE_ORDER) if (key.startswith(part) if part.endswith("/") else key == part))


def _part_key(kind: int, number: int) -> str:
    return f"{CLEAR_PREFIX}{kind}-{number:05d}.json"


class _ClearPlan:
    """The plan being written: keys go to their kind's sequence of parts, a part stored as soon
    as it holds ``CLEAR_PART_KEYS`` keys; ``finish`` stores the rest, then ``CLEAR_PLAN_KEY``."""

    def __init__(self, storage: Storage, fingerprint: str, parts: list[int]):
        self.storage, self.fingerprint, self.parts = storage, fingerprint, parts
        self.pending: list[list[str]] = [[] for _ in _DELETE_ORDER]

    def add(self, keys: Iterable[str]) -> None:
        for key in keys:
            kind = _kind(key)
            self.pending[kind].append(key)
            if len(self.pending[kind]) >= CLEAR_PART_KEYS:
                self._store(kind)

    def _store(self, kind: int) -> None:
        if self.pending[kind]:
            write_json(self.storage, _part_key(kind, self.parts[kind]), {"keys": self.pending[kind]})
            self.parts[kind] += 1
            self.pending[kind] = []

    def finish(self) -> dict[str, Any]:
        for kind in range(len(_DELETE_ORDER)):
            self._store(kind)
        plan = {"fingerprint": self.fingerprint, "parts": self.parts}
        write_json(self.storage, CLEAR_PLAN_KEY, plan)
        return plan


def _remove_plan(storage: Storage) -> None:
    """The plan's own files, the marker last (parts of an interrupted planning too)."""
    there = storage.list(CLEAR_PREFIX)
    storage.delete_many([k for k in there if k != CLEAR_PLAN_KEY])
    if CLEAR_PLAN_KEY in there:
        storage.delete(CLEAR_PLAN_KEY)


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
    object no commit of that job names or whose bytes are not the ones it wrote. The plan is
    written whole first (``CLEAR_PREFIX``), then carried out a part at a time in
    ``_DELETE_ORDER``; a plan there already for this job (a clear cut short) is kept and
    added to. OutputMismatch when OUT holds no job. Returns how many objects were deleted."""
    old = JobRecord.read(storage)
    finished = _finish_legacy_clear(storage, old)
    if finished is not None:
        return finished
    planned = read_json(storage, CLEAR_PLAN_KEY)
    if old is None and planned is not None:  # cut short after job.json went: only the plan is left
        _remove_plan(storage)
        return 0
    if old is None:
        raise OutputMismatch(
            f"--new-run: {storage.url} holds no sdbatch job (no {JOB_KEY}), so there is nothing sdbatch may delete; "
            "choose an empty --out, or move the files there away yourself"
        )
    if planned is None or planned.get("fingerprint") != old.fingerprint:
        _remove_plan(storage)  # another job's, or a planning cut short: planned again in full
        planned = {"parts": [0] * len(_DELETE_ORDER)}
    plan = _ClearPlan(storage, old.fingerprint, list(planned["parts"]))
    plan.add(_old_job_objects(storage, old))
    parts = plan.finish()["parts"]
    deleted = 0
    for kind, count in enumerate(parts):
        for number in range(count):
            keys = (read_json(storage, _part_key(kind, number)) or {}).get("keys", [])
            storage.delete_many(keys)
            deleted += len(keys)
    _remove_plan(storage)
    return deleted


def _finish_legacy_clear(storage: Storage, old: JobRecord | None) -> int | None:
    """A clear cut short by an sdbatch from before the plan in parts (``LEGACY_CLEAR_KEY``): its
    plan, written whole before its first delete, carried out as that sdbatch did (``_DELETE_ORDER``,
    job.json last), then removed; how many objects it named (None: no such plan of this job). Its
    commits may be gone already, so no later plan could name those images. A plan of another job
    (one whose clear finished past its job.json) names nothing of this one: only it is removed."""
    planned = read_json(storage, LEGACY_CLEAR_KEY)
    if planned is None:
        return None
    if old is not None and planned.get("fingerprint") != old.fingerprint:
        storage.delete(LEGACY_CLEAR_KEY)
        return None
    keys: list[str] = planned.get("keys", [])
    for kind in range(len(_DELETE_ORDER)):
        storage.delete_many([key for key in keys if _kind(key) == kind])
    storage.delete(LEGACY_CLEAR_KEY)
    return len(keys)


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


def _speed_of(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k.startswith("speed.")}


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
    keys = [k for k in new_spec if old_spec.get(k) != new_spec[k] and not k.startswith("speed.")]
    if keys:
        changes.append("the settings " + ", ".join(f"{k} ({old_spec.get(k)!r} → {new_spec[k]!r})" for k in keys))
    if old_spec and _speed_of(old_spec) != _speed_of(new_spec):  # exact has no keys: named apart
        changes.append(f"the speed profile ({existing.job_spec.speed.summary()} → {job.job_spec.speed.summary()})")
    for kind in ("model", "refiner"):  # a job may have no refiner, on either side
        old, new = getattr(existing, kind), getattr(job, kind)
        old_pin, new_pin = old and old.fingerprint, new and new.fingerprint
        if old_pin != new_pin:
            changes.append(f"the {kind} {(new or old).name!r} (pinned {old_pin} when that job was submitted, "
                           f"now {new_pin})")
    for name in sorted(set(existing.loras) | set(job.loras)):
        old, new = existing.loras.get(name), job.loras.get(name)
        pin = new or old
        if pin is not None and (old and old.sha256) != (new and new.sha256):
            changes.append(f"the LoRA {name}={pin.path} (sha256 {str(old and old.sha256)[:12]}… when that "
                           f"job was submitted, now {str(new and new.sha256)[:12]}…)")
    return "; ".join(changes) or f"job fingerprint {existing.fingerprint} there, {job.fingerprint} here"
