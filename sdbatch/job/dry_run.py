"""``sdbatch submit --dry-run``: what a submit would do, found without writing anything.

After the same validation and model preflight as a real submit, it checks the output
location read-only (a local OUT is not created; an S3 OUT gets the same create-once probe
as a real submit, which deletes its probe object), reads what OUT already holds (a job to
resume, a different job, objects no job there wrote, commits not carrying this job's
fingerprint: each refused as a real submit's claim would refuse it), and plans every
pending shard into its canonical batches (``plan.canonical_batches``, exactly as workers
will): shards, batches, fill ratio, the workers it would start, the model (family and
fingerprint), rows per image size, per model family and per LoRA set, and a time
estimate once OUT's progress knows a rate. OUT's state is read by ``output.state.read_state``
and the plan is the driver's own (``run.plan.job_plan``); Ray is never started and torch
never imported.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdbatch.data.index import JOB_KEY
from sdbatch.job.preflight import PreparedJob
from sdbatch.manifest.reader import ManifestReader
from sdbatch.output.claim import refuse_foreign_objects, what_changed
from sdbatch.output.commits import OutputMismatch, committed_shards, read_shard_index
from sdbatch.output.state import read_state
from sdbatch.run.plan import canonical_batches, job_plan
from sdbatch.run.policy import workers_to_start
from sdbatch.run.progress import devices_text
from sdbatch.storage.base import Storage, StorageConfigError
from sdbatch.storage.local import LocalStorage


@dataclass
class DryRunPlan:
    out: str
    rows_total: int
    shards_total: int
    rows_per_shard: int
    shards_committed: int = 0
    shards_pending: int = 0
    rows_pending: int = 0
    batches: int = 0
    batch_size: int = 1
    workers_asked: int = 1
    gpus_per_worker: float = 0.0
    model: str = "?"
    family: str = "?"
    fingerprint: str = "?"  # the model's pin (``ModelRef.pin``), as job.json records it
    model_traits: list[str] = field(default_factory=list)  # ``ModelTraits.describe``: native size, defaults, meaning
    rows_per_size: Counter = field(default_factory=Counter)  # (width, height) -> pending rows
    rows_per_lora: Counter = field(default_factory=Counter)
    out_state: str = "new job"
    refused: str | None = None  # why a real submit would refuse this OUT (exit 2)
    rate: float | None = None  # images/s that OUT's progress measured, if any

    @property
    def fill_ratio(self) -> float:
        return self.rows_pending / (self.batches * self.batch_size) if self.batches else 1.0

    @property
    def workers_text(self) -> str:
        """The workers a submit would start: no more than the shards to generate, and fewer if
        the cluster cannot place them (known only once Ray is up)."""
        workers, _ = workers_to_start(self.workers_asked, self.shards_pending, rows=self.rows_total,
                                      rows_per_shard=self.rows_per_shard, fresh_job=False)
        text = devices_text(workers, self.gpus_per_worker)
        if workers < self.workers_asked:
            text += f" ({self.workers_asked} asked for: no more than the shards to generate)"
        return text + ", fewer if the cluster cannot place them"

    @property
    def eta_seconds(self) -> float | None:
        return self.rows_pending / self.rate if self.rate else None

    def render(self) -> str:
        lines = [
            f"out        {self.out}  ({self.out_state})",
            f"shards     {self.shards_total} of up to {self.rows_per_shard} rows; "
            f"{self.shards_committed} already committed, {self.shards_pending} to generate ({self.rows_pending} rows)",
            f"batches    {self.batches} of up to {self.batch_size} rows; fill ratio {self.fill_ratio:.3f}",
            f"workers    {self.workers_text}",
            f"model      {self.model}  ({self.family}, fingerprint {self.fingerprint})",
            f"family     {self.family}: {self.rows_pending} rows",
            *(f"{'parameters' if i == 0 else '':10} {line}" for i, line in enumerate(self.model_traits)),
            "sizes      " + (", ".join(f"{w}x{h}: {n} rows" for (w, h), n in sorted(self.rows_per_size.items())) or "none"),
            "loras      " + (", ".join(f"{name}: {n} rows" for name, n in sorted(self.rows_per_lora.items())) or "none"),
        ]
        if self.eta_seconds is not None:
            lines.append(f"estimate   {self.eta_seconds:.0f} s at {self.rate:.3f} images/s (measured on this OUT)")
        else:
            lines.append("estimate   no rate known yet (a first run measures one; `sdbatch status` shows it)")
        if self.refused:
            lines.append(f"REFUSED    {self.refused}")
        return "\n".join(lines)


def check_output(storage: Storage) -> None:
    """The output location is usable, checked without leaving anything behind."""
    if not isinstance(storage, LocalStorage):
        storage.check_access()  # its probe object is deleted again
        return
    path = Path(storage.root)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise StorageConfigError(f"output path {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageConfigError(f"cannot create output directory {path}: {existing} is not writable; choose a writable location")


def plan_job(prepared: PreparedJob) -> DryRunPlan:
    """Check OUT read-only (``check_output``), read its state and plan every pending shard."""
    spec, manifest, storage, job = prepared.spec, prepared.source, prepared.storage, prepared.job
    new_run = prepared.request.new_run
    check_output(storage)
    rps, batch_size = spec.resources.rows_per_shard, spec.resources.batch_size
    shards = job_plan(manifest, spec)
    traits = prepared.model.traits
    assert traits is not None  # None only for a refiner
    plan = DryRunPlan(out=storage.url, rows_total=manifest.num_rows, shards_total=shards.num_shards,
                      rows_per_shard=rps, batch_size=batch_size, workers_asked=spec.resources.workers,
                      gpus_per_worker=spec.resources.gpus_per_worker, model=prepared.model.name,
                      family=traits.family.class_name, fingerprint=prepared.model.pin, model_traits=traits.describe())
    existing = read_state(storage, num_shards=shards.num_shards)
    committed: set[str] = set()
    if existing is None and new_run:
        plan.refused = (f"--new-run: {storage.url} holds no sdbatch job (no {JOB_KEY}), so there is nothing sdbatch "
                        "may delete; choose an empty --out, or move the files there away yourself")
    elif existing is not None and new_run:
        plan.out_state = f"holds job {existing.job.fingerprint}: --new-run would delete it first (only its own objects)"
    elif existing is None:
        try:  # what claim_job checks under the lock, read-only
            refuse_foreign_objects(storage)
        except OutputMismatch as exc:
            plan.refused = str(exc)
    elif existing.job.fingerprint != job.fingerprint:
        plan.out_state = f"holds a different job ({existing.job.fingerprint})"
        plan.refused = (f"{storage.url} already holds a different job: {what_changed(existing.job, job)}; choose a new "
                        "--out or pass --new-run to replace it")
    else:
        committed = committed_shards(storage, shards.num_shards)
        try:  # only commits carrying this job's fingerprint are trusted: each read, one at a time
            for name in sorted(committed, key=int):
                read_shard_index(storage, name, job.fingerprint)
        except OutputMismatch as exc:
            plan.refused = str(exc)
        finished = existing.phase == "finished"
        plan.out_state = f"resumes job {job.fingerprint}" + (" (already finished)" if finished else "")
        progress = existing.progress
        plan.rate = (progress.images_per_second or None) if progress else None
    plan.shards_committed = len(committed)
    reader = ManifestReader(manifest)
    for work in shards.pending(committed):
        rows = reader.read_rows_at(spec, work.rows)
        plan.shards_pending += 1
        plan.rows_pending += len(rows)
        plan.batches += len(canonical_batches(rows, batch_size))
        for row in rows:
            plan.rows_per_size[row.width, row.height] += 1
            loras = row.parameters().get("loras")
            plan.rows_per_lora[json.dumps(loras, sort_keys=True, default=str) if loras else "no LoRA"] += 1
    if plan.rows_per_lora.keys() == {"no LoRA"}:
        plan.rows_per_lora.clear()
    return plan
