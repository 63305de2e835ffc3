"""The JSON documents a job keeps in OUT, as typed models read and written only here.

    _sdbatch/job.json       JobRecord     which job OUT holds: spec, manifest and model pins
    _sdbatch/progress.json  Progress      the driver's snapshot, rewritten every few seconds
    _SUCCESS                Success       the finished job's summary, written last
    _sdbatch/lock.json      (a dict)      the driver's lease: ``lock`` reads it through ``parse_json``

Every model forbids keys it does not know (pydantic ``extra="forbid"``), so a document another
tool wrote or edited is not taken for ours; fields added after a document's first version have
defaults, so files older sdbatch versions wrote stay readable. A file that is not JSON, or not
the document, is a ``CorruptState`` (exit 2) naming the file and how to recover.
Imports: ``errors``, ``spec``, ``storage``, pydantic. Pure.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sdbatch.data.index import JOB_KEY
from sdbatch.errors import BadInput
from sdbatch.spec import JobSpec
from sdbatch.storage.base import NotFound, Storage

LOCK_KEY = "_sdbatch/lock.json"
PROGRESS_KEY = "_sdbatch/progress.json"
SUCCESS_KEY = "_SUCCESS"


class CorruptState(BadInput):
    """One of OUT's job-state files is not the JSON sdbatch wrote (truncated, edited, another tool's)."""


#: How to recover from each job-state file being unreadable.
_RECOVERY = {
    JOB_KEY: "it records which job OUT holds: restore it, or start over with `sdbatch submit … --new-run`",
    LOCK_KEY: "it is the driver's lease: once no driver is running, remove it with `sdbatch unlock OUT --force`",
    PROGRESS_KEY: "it is only a progress snapshot: delete it, the next run rewrites it",
    SUCCESS_KEY: "it is the finished job's summary: delete it and rerun the same command to rewrite it",
}


def _corrupt(storage: Storage, key: str, what: str) -> CorruptState:
    return CorruptState(f"{storage.url}/{key} is corrupt ({what}); {_RECOVERY.get(key, 'delete it')}")


def parse_json(storage: Storage, key: str, data: bytes) -> dict[str, Any]:
    """A job-state file's JSON object, or CorruptState naming the file and the recovery."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        doc = exc
    if not isinstance(doc, dict):
        raise _corrupt(storage, key, f"not a JSON object: {str(doc)[:80]}")
    return doc


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return parse_json(storage, key, storage.get(key))
    except NotFound:
        return None


def write_json(storage: Storage, key: str, data: dict[str, Any]) -> None:
    storage.put(key, json.dumps(data, indent=2, sort_keys=True).encode())


class Document(BaseModel):
    """A job-state document at ``KEY``."""

    model_config = ConfigDict(extra="forbid")
    KEY: ClassVar[str]

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()

    @classmethod
    def parse(cls, storage: Storage, data: bytes) -> Any:
        """The document in ``data`` (read from ``storage``), or CorruptState."""
        doc = parse_json(storage, cls.KEY, data)
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the document"
            raise _corrupt(storage, cls.KEY, f"not sdbatch's {cls.__name__}: {where}: {first['msg']}") from None

    @classmethod
    def read(cls, storage: Storage) -> Any:
        """The document OUT holds, None when there is none (CorruptState when it is not one)."""
        try:
            return cls.parse(storage, storage.get(cls.KEY))
        except NotFound:
            return None

    def write(self, storage: Storage) -> None:
        storage.put(self.KEY, self.to_bytes())


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ManifestPin(_Part):
    source: str
    fingerprint: str
    num_rows: int
    files: list[str] = []
    base_dir: str | None = None  # what relative init_image paths were relative to: a place init images are read from


class ModelPin(_Part):
    name: str
    fingerprint: str | None  # None: an s3:// model pinned later, by its workers (see models)


class LoraPin(_Part):
    path: str
    sha256: str


class JobRecord(Document):
    """``_sdbatch/job.json``: which job OUT holds. Its ``fingerprint`` covers everything that
    decides the images and where rows land (``output.job_record`` computes it)."""

    KEY: ClassVar[str] = JOB_KEY
    fingerprint: str
    spec: dict[str, Any]  # JobSpec.model_dump(mode="json"); ``job_spec`` validates it
    manifest: ManifestPin
    model: ModelPin
    loras: dict[str, LoraPin] = {}
    refiner: ModelPin | None = None  # model.refiner, pinned like the model
    sdbatch_version: str | None = None
    created_at: str | None = None

    @property
    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.spec)


class WorkerProgress(_Part):
    rows_done: int
    rows_failed: int
    images_per_second: float | None


class FailedShard(_Part):
    """A shard that failed every attempt it was given this run (``policy.Schedule.failures``)."""

    shard: str
    attempts: int
    error: str


class Progress(Document):
    """``_sdbatch/progress.json``: the driver's snapshot (``progress.ProgressFeed``)."""

    KEY: ClassVar[str] = PROGRESS_KEY
    state: str = "running"
    rows_total: int = 0
    rows_done: int = 0  # rows in committed shards: durable
    rows_in_flight: int = 0  # generated this run in shards not yet committed (lost if the run stops)
    rows_failed_this_run: int = 0
    rows_remaining: int = 0
    rows_generated_this_run: int = 0
    images_per_second: float = 0.0
    eta_seconds: float | None = None
    shards_total: int | None = None
    shards_committed: int = 0
    shards_failed: int = 0
    workers: int = 0
    failed_shards: list[FailedShard] = []  # set when the run ends
    per_worker: dict[str, WorkerProgress] = {}
    history: list[tuple[float, int, int]] = []  # (epoch seconds, rows done, rows failed this run), kept across runs
    started_at: str | None = None
    updated_at: str | None = None


class FailedRow(_Part):
    id: str
    error: str


class Success(Document):
    """``_SUCCESS``: the summary of the run that finished the job, written last."""

    KEY: ClassVar[str] = SUCCESS_KEY
    fingerprint: str
    rows_total: int
    rows_in_index: int
    rows_ok: int
    rows_failed: int
    rows_duplicate: int | None = None
    rows_generated_this_run: int = 0
    shards_skipped: int = 0
    wall_seconds_this_run: float | None = None
    images_per_second_this_run: float | None = None
    failed_rows: list[FailedRow] = []  # the first ones (output.FAILED_ROWS_SHOWN)
    batches: int | None = None
    batch_size: int | None = None
    batch_fill: float | None = None
    finished_at: str | None = None
    sdbatch_version: str | None = None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
