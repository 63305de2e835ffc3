"""Auditing a job's output: ``verify`` (every indexed object is there, intact) and
``reproduce`` (regenerate one image from the output's metadata alone and compare bytes).

Nothing here imports torch at module level: ``verify`` without regeneration is pure storage
and Parquet work; ``reproduce_row`` imports ``sdbatch.generate`` only when it needs the model.

How an image is rebuilt (DESIGN §3): the target row's JSON record (embedded in the stored
image when its bytes are the ones the index recorded, else rebuilt from the index: an image
is never trusted over the job's own record) and ``job.json`` (model, output format and
encoder settings) give everything; the rows named in the record's ``batch_rows`` are rebuilt
from the index, in order, so the batch that is regenerated is the batch that ran. The job's
model (job.json, or ``--model``) is loaded on the recorded device and dtype, its fingerprint
is checked against the recorded one, the batch is generated, and the target image is encoded
with the *same record* — so the bytes match exactly when, and only when, the pixels match.
img2img rows re-read their init image from the recorded location (an absolute path or
``s3://`` URI), only inside the places the job read init images from (submit's rule, from
``job.json``) and up to ``limits.max_init_image_bytes``; if it is gone the row cannot be
reproduced, and if its content changed since the job ran (its bytes' sha256 differs from the
recorded ``init_image_sha256``) the result says so in a note: the regenerated image is
expected to differ.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch import encode
from sdbatch.errors import BadInput
from sdbatch.layout import PREFIXES, Layout, differs, layout_for, sha256
from sdbatch.manifest import InitImagePlaces, init_image_places
from sdbatch.data.row import Row
from sdbatch.documents import JOB_KEY, SUCCESS_KEY, JobRecord
from sdbatch.output import FINGERPRINT_META, INDEX_KEY, OutputMismatch, committed_index, committed_shards, merge_index
from sdbatch.data.index import INDEX_COLUMN_TYPES, STATUS_OK
from sdbatch.spec import JobSpec
from sdbatch.data.record import ImageRecord, embedded_record, passthrough_of, row_from_stored
from sdbatch.storage.base import NotFound, Storage, StorageError
from sdbatch.storage.open import open_storage, read_uri

if TYPE_CHECKING:
    from sdbatch.models.runtime import Generator

__all__ = [
    "AuditError",
    "JobOutput",
    "ReproduceResult",
    "Reproducer",
    "VerifyReport",
    "open_job",
    "reproduce_row",
    "verify",
]


class AuditError(BadInput, ValueError):
    """Bad input for an audit (no job at OUT, unknown row id, a row that cannot be rebuilt)."""


# ---------------------------------------------------------------------------------------------
# the job's output, read once


@dataclass
class JobOutput:
    storage: Storage
    job: JobRecord
    spec: JobSpec
    index: list[dict[str, Any]]
    index_source: str  # "index.parquet" or "N committed shard indexes"
    finished: bool
    index_error: str | None = None  # index.parquet is there but not this job's readable index

    @property
    def layout(self) -> Layout:
        return layout_for(self.storage, self.spec.output)

    def rows_by_id(self) -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in self.index}

    @property
    def init_image_places(self) -> InitImagePlaces:
        """Where the job read init images from (submit's rule, from job.json)."""
        pin = self.job.manifest
        local_files = [f for f in pin.files if "://" not in f]
        # a job.json of an older sdbatch has no base_dir: its files' common folder is never wider
        base_dir = pin.base_dir or (os.path.commonpath([os.path.dirname(f) for f in local_files]) if local_files else None)
        return init_image_places(base_dir, self.spec, [self.storage.url, self.spec.model.name, pin.source])


def open_job(storage: Storage | str, *, endpoint_url: str | None = None) -> JobOutput:
    """Read ``job.json`` and the index (the final one, else the committed shard indexes).
    Raises ``AuditError`` when OUT holds no sdbatch job."""
    if isinstance(storage, str):
        storage = open_storage(storage, endpoint_url=endpoint_url)
    job = JobRecord.read(storage)
    if job is None:
        raise AuditError(f"no sdbatch job at {storage.url} (no {JOB_KEY})")
    spec = job.job_spec
    index_error = None
    try:
        table = pq.read_table(io.BytesIO(storage.get(INDEX_KEY)))
        if (table.schema.metadata or {}).get(FINGERPRINT_META) != job.fingerprint.encode():
            raise ValueError("it does not carry this job's fingerprint")
        source = INDEX_KEY
    except (NotFound, pa.ArrowInvalid, ValueError) as exc:
        if not isinstance(exc, NotFound):
            index_error = f"{INDEX_KEY} is not this job's readable index ({exc}); rebuild it with --rebuild-index"
        try:
            table, merged = committed_index(storage, job.fingerprint)
        except OutputMismatch as foreign:
            raise AuditError(str(foreign)) from None
        source = f"{merged} committed shard indexes" + ("" if index_error else " (job unfinished)")
    finished = source == INDEX_KEY and storage.exists(SUCCESS_KEY)
    return JobOutput(storage, job, spec, table.to_pylist() if table.num_rows else [], source, finished, index_error)


def max_pixel_diff(a: bytes, b: bytes) -> int | None:
    """Largest absolute difference of any channel of any pixel (0..255); None if either does
    not decode or their sizes differ."""
    import numpy as np
    from PIL import Image

    try:
        ia, ib = (Image.open(io.BytesIO(x)) for x in (a, b))
        if ia.size != ib.size:
            return None
        pa_, pb_ = (np.asarray(i.convert("RGB"), dtype=np.int16) for i in (ia, ib))
    except Exception:  # noqa: BLE001 - undecodable stored bytes (corrupted object)
        return None
    return int(np.abs(pa_ - pb_).max())


# ---------------------------------------------------------------------------------------------
# reproduce


@dataclass
class ReproduceResult:
    id: str
    key: str
    match: bool  # the regenerated bytes' sha256 equals the sha256 recorded in the index
    max_pixel_diff: int | None  # vs the stored object; None when it is missing or undecodable
    recorded_sha256: str
    stored_sha256: str | None  # of the object in storage now (None: missing)
    new_sha256: str
    data: bytes = field(repr=False)  # the regenerated image bytes
    batch_id: str = ""
    batch_rows: list[str] = field(default_factory=list)
    batch_rebuilt: bool = True  # False: some batch-mates could not be rebuilt, the batch differs
    record_source: str = "image"  # "image" (embedded record) or "index" (rebuilt from the index)
    model_fingerprint_ok: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.match:
            return f"{self.id}: bytes match (sha256 {self.new_sha256[:16]}…)"
        diff = "unknown (stored object missing or unreadable)" if self.max_pixel_diff is None else str(self.max_pixel_diff)
        return (f"{self.id}: DRIFT — regenerated sha256 {self.new_sha256[:16]}… ≠ recorded {self.recorded_sha256[:16]}…, "
                f"largest pixel difference {diff}")


class Reproducer:
    """Regenerates rows of one job output. Keeps the loaded model and any batch it already
    regenerated, so ``verify --regenerate K`` loads the model once and runs each batch once."""

    def __init__(self, out: JobOutput, *, endpoint_url: str | None = None, model: str | None = None,
                 device: str | None = None):
        self.out = out
        self.endpoint_url = endpoint_url
        self.model_override = model
        self.device_override = device
        self.by_id = out.rows_by_id()
        self.layout = out.layout
        self.places = out.init_image_places
        self._generators: dict[tuple[str, str, str], Generator] = {}
        self._batches: dict[tuple, dict[str, Any]] = {}

    # -- the record ---------------------------------------------------------------------------
    def _stored(self, entry: dict[str, Any]) -> bytes | None:
        try:
            return self.layout.read(entry["key"])
        except NotFound:
            return None
        except StorageError as exc:
            if getattr(exc, "transient", False):
                raise
            return None

    def _record(self, entry: dict[str, Any], stored: bytes | None) -> tuple[ImageRecord, dict[str, Any], str | None]:
        """The row's record, the JSON its image embeds (re-encoded as stored, so the bytes of
        an image of any sdbatch version can match), and why it was rebuilt from the index (None:
        it is the stored image's own, trusted only when those are the bytes the index recorded)."""
        why = "the stored image is missing or unreadable"
        problem = differs(entry, stored) if stored is not None else None
        if problem:
            why = f"the stored image is not the one the index recorded ({problem}), so its embedded record is not trusted"
        elif stored is not None:
            try:
                _, embedded = encode.read_embedded(stored)
            except Exception:  # noqa: BLE001 - a corrupted object
                embedded = None
            record = embedded_record(embedded, entry)
            if record is not None:
                return record, embedded, None
        gen = self._generator_for(entry.get("device"), entry.get("dtype"))
        record = ImageRecord.from_index_row(entry, gen, model_name=self.out.spec.model.name,
                                            refiner_name=self.out.spec.model.refiner,
                                            sdbatch_version=self.out.job.sdbatch_version)
        return record, record.to_embedded(), why

    # -- the model -----------------------------------------------------------------------------
    def _load_settings(self, device: str | None, dtype: str | None) -> tuple[str, str, str, list[str]]:
        """The model (the job's, or ``--model``), device and dtype to regenerate with, and notes."""
        notes: list[str] = []
        model = self.model_override or self.out.spec.model.name
        device = self.device_override or device or "cpu"
        dtype = dtype or "float32"
        if device.startswith("cuda") and not self.device_override:
            import torch

            if not torch.cuda.is_available():
                notes.append(f"recorded device {device} is not available here; regenerating on cpu "
                             "(expect pixel differences: see README, Reproducibility)")
                device = "cpu"
        if device == "cpu" and dtype == "float16":
            notes.append("recorded dtype float16 on cpu: regenerating in float16 on cpu is slow and differs from GPU")
        return model, ("cuda" if device.startswith("cuda") else device), dtype, notes

    def _generator_for(self, device: str | None, dtype: str | None) -> Generator:
        model, device, dtype, _ = self._load_settings(device, dtype)
        key = (model, device, dtype)
        if key not in self._generators:
            from sdbatch.models.runtime import Generator

            self._generators[key] = Generator.load(model, device=device, dtype=dtype, endpoint_url=self.endpoint_url,
                                                   loras=self.out.spec.loras, refiner=self.out.spec.model.refiner)
        return self._generators[key]

    # -- the batch -----------------------------------------------------------------------------
    def _init_image(self, uri: str):
        """The init image at ``uri`` now, and the sha256 hex of its bytes; read only inside the
        job's places and size limit, as the worker read it."""
        from PIL import Image

        where, inside = self.places.resolve(uri)
        if not inside:
            raise AuditError(f"init image {uri} resolves to {where}, outside the places this job read init images "
                             f"from ({self.places}), where sdbatch reads none; `sdbatch verify OUT` compares the index "
                             "with the job's commits and manifest")
        data = read_uri(where, endpoint_url=self.endpoint_url, max_bytes=self.out.spec.limits.max_init_image_bytes)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image, sha256(data)

    def _generate_batch(self, record: ImageRecord, gen: Generator) -> dict[str, Any]:
        """Regenerate the batch the record names; returns {id: uint8 pixels} plus notes, and the
        sha256 of each init image as read now ({id: hex}, img2img batches)."""
        target = record.row
        batch_ids = list(record.batch_rows or [target.id])
        cache_key = (record.batch_id, tuple(batch_ids), id(gen))
        if cache_key in self._batches:
            return self._batches[cache_key]
        notes: list[str] = []
        rebuilt = True
        rows: list[Row] = []
        for rid in batch_ids:
            if rid == target.id:
                rows.append(target)
                continue
            entry = self.by_id.get(rid)
            if entry is None:
                notes.append(f"batch-mate {rid} is not in the index; regenerating without it")
                rebuilt = False
                continue
            row = row_from_stored(entry, passthrough_of(entry))
            if row.batch_key() != target.batch_key():
                notes.append(f"batch-mate {rid} has other batch parameters in the index; regenerating without it")
                rebuilt = False
                continue
            rows.append(row)
        if target.id not in batch_ids:
            rows = [target]
            rebuilt = False
            notes.append("the record's batch_rows does not list the row itself; regenerating it alone")
        init_images = None
        init_sha256: dict[str, str] = {}
        if target.is_img2img:
            init_images, kept = [], []
            for row in rows:
                try:
                    image, init_sha256[row.id] = self._init_image(row.init_image)
                    init_images.append(image)
                    kept.append(row)
                except (StorageError, OSError, ValueError) as exc:
                    if row.id == target.id:
                        raise AuditError(
                            f"row {target.id}: its init image {row.init_image} cannot be read ({exc}); "
                            "an img2img row is reproduced from its init image at the recorded location"
                        ) from None
                    notes.append(f"batch-mate {row.id}: init image {row.init_image} unreadable; regenerating without it")
                    rebuilt = False
            rows = kept
        generated = gen.generate(rows, init_images)
        result = {"images": {r.id: pixels for r, pixels in zip(rows, generated.pixels)}, "notes": notes, "rebuilt": rebuilt,
                  "rows": [r.id for r in rows], "init_sha256": init_sha256}
        self._batches[cache_key] = result
        return result

    def _init_image_notes(self, record: ImageRecord, batch: dict[str, Any]) -> list[str]:
        """Notes for init images whose bytes differ from the sha256 recorded when the job ran:
        the target's (its record's hash), then any other init image of its batch (the index's)."""
        notes, mates = [], {}
        target = record.row.id
        for rid, now in batch["init_sha256"].items():
            mate = self.by_id.get(rid, {})
            recorded, uri = ((record.init_image_sha256, record.row.init_image) if rid == target
                             else (mate.get("init_image_sha256"), mate.get("init_image")))
            if not recorded or recorded == now:
                continue
            change = f"init image {uri} changed since generation: recorded sha256 {recorded[:12]}…, now {now[:12]}…"
            if rid == target:
                notes.insert(0, f"{change}; the regenerated image is expected to differ")
            elif uri != record.row.init_image:
                mates.setdefault(change, []).append(rid)
        notes.extend(f"{change} (batch-mates {', '.join(ids)}); batch-mates can shift the image slightly"
                     for change, ids in mates.items())
        return notes

    # -- one row -------------------------------------------------------------------------------
    def reproduce(self, row_id: str) -> ReproduceResult:
        entry = self.by_id.get(str(row_id))
        if entry is None:
            raise AuditError(f"no row with id {row_id!r} in the index of {self.out.storage.url} ({self.out.index_source})")
        if entry.get("status") != STATUS_OK:
            raise AuditError(f"row {row_id!r} has status {entry.get('status')!r} ({entry.get('error')}); "
                             "there is no image to reproduce")
        stored = self._stored(entry)
        record, embedded, rebuilt_why = self._record(entry, stored)
        _, _, _, notes = self._load_settings(record.device, record.dtype)
        if rebuilt_why:
            notes.append(f"{rebuilt_why}: its record was rebuilt from the index")
        gen = self._generator_for(record.device, record.dtype)
        fp_ok = gen.info.fingerprint == record.model_fingerprint
        if not fp_ok:
            notes.insert(0, f"MODEL CHANGED: the model loaded from {gen.info.name!r} has fingerprint "
                            f"{gen.info.fingerprint[:16]}…, the image was made with {record.model_fingerprint[:16]}…; "
                            "the result is not expected to match (pass the original model with --model)")
        if record.refiner_fingerprint and gen.info.refiner_fingerprint != record.refiner_fingerprint:
            notes.insert(0, f"REFINER CHANGED: the refiner loaded from {gen.info.refiner_name!r} has fingerprint "
                            f"{str(gen.info.refiner_fingerprint)[:16]}…, the image was made with {record.refiner_fingerprint[:16]}…; "
                            "the result is not expected to match (restore the original refiner)")
        changed = {k: (v, gen.info.versions.get(k)) for k, v in record.versions.items() if gen.info.versions.get(k) != v}
        if changed:
            notes.append("software versions differ from the recorded ones: "
                         + ", ".join(f"{k} {a} → {b}" for k, (a, b) in sorted(changed.items())))
        import torch

        previous_threads = torch.get_num_threads()
        threads = record.torch_threads or int(self.out.spec.resources.cpus_per_worker)
        torch.set_num_threads(max(1, threads))  # as the worker ran: the last bit depends on it
        try:
            batch = self._generate_batch(record, gen)
        finally:
            torch.set_num_threads(previous_threads)
        notes.extend(f"LoRA {a['name']} changed since generation: recorded sha256 {a['sha256'][:12]}…, "
                     f"now {str(gen.loras.sha256.get(a['name']))[:12]}…"
                     for a in record.loras if gen.loras.sha256.get(a["name"]) != a.get("sha256"))
        out_spec = self.out.spec.output
        data = encode.encode_image(batch["images"][entry["id"]], embedded, fmt=out_spec.image_format,
                                   png_compress_level=out_spec.png_compress_level, quality=out_spec.quality)
        new_sha = sha256(data)
        notes.extend(self._init_image_notes(record, batch))
        return ReproduceResult(
            id=entry["id"],
            key=entry["key"],
            match=new_sha == entry["sha256"],
            max_pixel_diff=max_pixel_diff(stored, data) if stored is not None else None,
            recorded_sha256=entry["sha256"],
            stored_sha256=sha256(stored) if stored is not None else None,
            new_sha256=new_sha,
            data=data,
            batch_id=record.batch_id,
            batch_rows=batch["rows"],
            batch_rebuilt=batch["rebuilt"],
            record_source="index" if rebuilt_why else "image",
            model_fingerprint_ok=fp_ok,
            notes=notes + batch["notes"],
        )


def reproduce_row(storage: Storage | str, row_id: str, *, endpoint_url: str | None = None,
                  model: str | None = None) -> ReproduceResult:
    """Regenerate the image of ``row_id`` from OUT's metadata alone and compare it with the
    stored object. ``model`` overrides the recorded model location (for a moved model; its
    fingerprint is still checked against the recorded one)."""
    return Reproducer(open_job(storage, endpoint_url=endpoint_url), endpoint_url=endpoint_url, model=model).reproduce(row_id)


# ---------------------------------------------------------------------------------------------
# verify


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
        """Orphans do not count: readers trust the index, never a listing (DESIGN §4)."""
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
    from sdbatch.manifest import ManifestError, iter_row_batches, open_manifest
    from sdbatch.data.row import default_row_id

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
