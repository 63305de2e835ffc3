"""Opening a finished job's OUT for reading: its storage, record, spec and manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sdbatch.data.index import JOB_KEY
from sdbatch.errors import BadInput
from sdbatch.manifest.init_roots import InitImagePlaces, init_image_places
from sdbatch.output.commits import OutputMismatch
from sdbatch.output.documents import SUCCESS_KEY, JobRecord
from sdbatch.output.index import JobIndex, open_index
from sdbatch.output.layout import Layout, layout_for
from sdbatch.spec import JobSpec
from sdbatch.storage.base import Storage
from sdbatch.storage.locations import has_scheme
from sdbatch.storage.open import open_storage


class AuditError(BadInput, ValueError):
    """Bad input for an audit (no job at OUT, unknown row id, a row that cannot be rebuilt)."""


@dataclass
class JobOutput:
    storage: Storage
    job: JobRecord
    spec: JobSpec
    index: JobIndex  # read a slice at a time: never the whole index in Python objects
    finished: bool

    @property
    def index_source(self) -> str:
        """"index.parquet" or "N committed shard indexes"."""
        return self.index.source + ("" if self.index.final or self.index_error else " (job unfinished)")

    @property
    def index_error(self) -> str | None:
        """Why index.parquet, being there, is not this job's readable index (None: it is, or is absent)."""
        problem = self.index.problem
        return f"{problem}; rebuild it with --rebuild-index" if problem else None

    @property
    def layout(self) -> Layout:
        return layout_for(self.storage, self.spec.output)

    @property
    def init_image_places(self) -> InitImagePlaces:
        """Where the job read init images from (submit's rule, from job.json)."""
        pin = self.job.manifest
        local_files = [f for f in pin.files if not has_scheme(f)]
        # a job.json of an older sdbatch has no base_dir: its files' common folder is never wider
        base_dir = pin.base_dir or (os.path.commonpath([os.path.dirname(f) for f in local_files]) if local_files else None)
        return init_image_places(base_dir, self.spec, [self.storage.url, self.spec.model.name, pin.source])


def open_job(storage: Storage | str, *, endpoint_url: str | None = None) -> JobOutput:
    """Open ``job.json`` and the index (the final one, else the committed shard indexes).
    Raises ``AuditError`` when OUT holds no sdbatch job, or a commit there is another job's."""
    if isinstance(storage, str):
        storage = open_storage(storage, endpoint_url=endpoint_url)
    job = JobRecord.read(storage)
    if job is None:
        raise AuditError(f"no sdbatch job at {storage.url} (no {JOB_KEY})")
    try:
        index = open_index(storage, job.fingerprint)
    except OutputMismatch as foreign:
        raise AuditError(str(foreign)) from None
    return JobOutput(storage, job, _as_run(job), index, index.final and storage.exists(SUCCESS_KEY))


def _as_run(job: JobRecord) -> JobSpec:
    """The job's spec as its workers ran it: a job.json written before sdbatch read A1111 prompt
    syntax has no ``model.prompt_syntax``, and its prompts were read as text."""
    spec = job.job_spec
    if "prompt_syntax" in job.spec.get("model", {}):
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"prompt_syntax": "literal"})})
