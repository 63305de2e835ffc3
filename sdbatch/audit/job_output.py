"""Opening a finished job's OUT for reading: its storage, record, spec and manifest."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.index import JOB_KEY
from sdbatch.errors import BadInput
from sdbatch.manifest.init_roots import InitImagePlaces, init_image_places
from sdbatch.output.commits import FINGERPRINT_META, OutputMismatch
from sdbatch.output.documents import SUCCESS_KEY, JobRecord
from sdbatch.output.index import INDEX_KEY, committed_index
from sdbatch.output.layout import Layout, layout_for
from sdbatch.spec import JobSpec
from sdbatch.storage.base import NotFound, Storage
from sdbatch.storage.locations import has_scheme
from sdbatch.storage.open import open_storage


class AuditError(BadInput, ValueError):
    """Bad input for an audit (no job at OUT, unknown row id, a row that cannot be rebuilt)."""


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
        local_files = [f for f in pin.files if not has_scheme(f)]
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
