"""``sdbatch export``: a job's images and index rows, selected, written as a training dataset
in output shards of bounded size — streaming, in parallel, resumable, to a folder or ``s3://``.

* ``hf``: the Hugging Face Hub's Parquet layout — ``DEST/data/<split>-00000-of-000NN.parquet``,
  each row the image (``image``: the ``datasets`` Image feature, its bytes inline) and the
  chosen index columns (``--columns``; default all); ``datasets.load_dataset(DEST)`` (or
  ``load_dataset("parquet", data_files=…)``) loads it, ``--class-column`` as a ``ClassLabel``.
* ``webdataset``: ``DEST/shard-NNNNNN.tar`` (``DEST/<split>/shard-NNNNNN.tar`` with splits),
  each sample ``<key>.<ext>`` + ``<key>.json`` (the row's columns, labels at the top level) and,
  with ``--class-column``, ``<key>.cls`` (the class number).

Rows are selected with ``--where``, a SQL boolean expression over the index columns
(``"not blank and duplicate_of is null"``) evaluated by DuckDB one record batch of the index at
a time, with file and network access switched off; only rows whose image exists
(``status = 'ok'``) are exported. ``--split train=0.9,test=0.1`` puts each row in a split by a
stable hash of its id. Nothing holds the index: a first pass (``plan_export``) streams it and
cuts each split's rows into output shards of about ``--shard-size`` bytes (the ``bytes`` its
rows recorded) — each a range of manifest rows —; ``write_shard`` then writes one output shard
from its range alone (row-group statistics on ``row``), anywhere: in this process, or in Ray
tasks handed in by the caller (``run_tasks``; this package imports no Ray).

Resumable: ``DEST/.sdbatch-export/`` (hidden: ``datasets`` and webdataset globs skip it) holds
the plan and a marker per output shard written after its object. Rerunning the same command
writes only the shards without a marker and never rewrites a marked one; a DEST holding
anything else — another export, other files — is refused. ``complete.json`` marks a finished
export. Each image's bytes are checked against the size and sha256 its index row recorded as
they are copied: a shard meeting other bytes is not written (``ImagesMismatched``, exit 5,
naming the rows; the others are), or with ``skip_mismatched`` those rows are left out and
named in a warning. An empty selection is refused (exit 2) before anything is written.
OUT and DEST may each be local or ``s3://``. No torch, no Ray here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from sdbatch.data.index import JOB_KEY, STATUS_OK
from sdbatch.errors import BadInput, JobFailed
from sdbatch.output.commits import OutputMismatch
from sdbatch.output.documents import JobRecord
from sdbatch.output.index import JobIndex, open_index
from sdbatch.output.layout import Layout, differs, layout_for, webdataset_key
from sdbatch.storage.base import NotFound, Storage
from sdbatch.storage.open import open_storage

log = logging.getLogger("sdbatch.export")


FORMATS = ("hf", "webdataset")
#: The column the Hugging Face layout adds itself; an index column of that name would clash.
HF_IMAGE_COLUMN = "image"
#: The Hub's advice for Parquet shards is a few hundred MB; one output shard is written by one task.
DEFAULT_SHARD_BYTES = 512 << 20
MAX_ROWS_NAMED = 20
MAX_CLASSES = 10_000  # more distinct values than this is not a class column
#: Rows a shard writer reads and checks at a time (their images are held together).
ROWS_PER_SLICE = 64
#: An ``hf`` shard's Parquet row group: slices gathered until this many image bytes or rows.
#: One row group per slice made 1,587 groups in a shard of 100,000 small images, whose footer
#: (8 MB, held by the writer until it closes) grew the export's peak by 100 MiB (issue 23).
ROW_GROUP_BYTES = 32 << 20
ROW_GROUP_ROWS = 16_384
#: The columns a shard writer needs whatever ``--columns`` says: to find, check and name each image.
_WORKING_COLUMNS = ("row", "id", "status", "key", "bytes", "sha256")
#: The columns the planning pass needs whatever ``--columns`` says: to select, split and size rows.
_PLANNING_COLUMNS = ("row", "id", "status", "bytes")
MARK_DIR = ".sdbatch-export"
PLAN_KEY = f"{MARK_DIR}/plan.json"
DONE_PREFIX = f"{MARK_DIR}/done/"
COMPLETE_KEY = f"{MARK_DIR}/complete.json"
DEFAULT_SPLIT = "train"


class ExportError(BadInput, ValueError):
    """Bad input to ``sdbatch export`` (no job at OUT, a bad option or --where, DEST in use)."""


class ImagesMismatched(JobFailed):
    """Stored images whose bytes are not the ones their index rows recorded (exit 5)."""


def name_rows(rows: list[tuple[str, str, str]], limit: int = MAX_ROWS_NAMED) -> str:
    """``id key (what differs)`` of each row, the first ``limit`` of them."""
    named = "; ".join(f"{rid} {key} ({what})" for rid, key, what in rows[:limit])
    return named + (f"; … and {len(rows) - limit} more" if len(rows) > limit else "")


def iter_images(layout: Layout, rows: pa.Table) -> Iterator[tuple[dict[str, Any], bytes, str | None]]:
    """Each ok row of ``rows`` with its image bytes and how they differ from what the row
    recorded (None: they are its image); ``grid`` reads its cells so."""
    for entry in rows.filter(pc.equal(rows.column("status"), STATUS_OK)).to_pylist():
        data = layout.read(entry["key"])
        yield entry, data, differs(entry, data)


def _job(storage: Storage) -> JobRecord:
    job = JobRecord.read(storage)
    if job is None:
        raise ExportError(f"no sdbatch job at {storage.url} (no {JOB_KEY})")
    return job


def _open_job_index(storage: Storage) -> tuple[JobRecord, JobIndex]:
    job = _job(storage)
    try:
        return job, open_index(storage, job.fingerprint)
    except OutputMismatch as exc:  # a commit this job did not write: not exported
        raise ExportError(str(exc)) from None


# --- options -----------------------------------------------------------------------------------


class ExportOptions(BaseModel):
    """What an export holds and how it is cut; stored in its plan, so a rerun resumes only the
    same export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str
    where: str | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    skip_mismatched: bool = False
    columns: tuple[str, ...] | None = None
    class_column: str | None = None
    splits: tuple[tuple[str, float], ...] = ()


def parse_splits(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"train=0.9,test=0.1"`` → (("train", 0.9), ("test", 0.1)); the fractions sum to 1."""
    if not text:
        return ()
    splits: list[tuple[str, float]] = []
    for part in text.split(","):
        name, _, fraction = part.strip().partition("=")
        try:
            value = float(fraction)
        except ValueError:
            value = -1.0
        if not name.replace("_", "").isalnum() or not 0 < value <= 1 or name in dict(splits):
            raise ExportError(f"--split {text!r}: {part.strip()!r} is not NAME=FRACTION (a new split name of letters, "
                              "digits and _, a fraction in (0, 1]); write e.g. --split train=0.9,test=0.1")
        splits.append((name, value))
    if abs(sum(v for _, v in splits) - 1) > 1e-9:
        raise ExportError(f"--split {text!r}: the fractions sum to {sum(v for _, v in splits):g}, not 1; "
                          "write e.g. --split train=0.9,test=0.1")
    return tuple(splits)


def _check_options(options: ExportOptions) -> None:
    if options.to not in FORMATS:
        raise ExportError(f"--to {options.to!r}: use one of {', '.join(FORMATS)}")
    if options.shard_bytes < 1:
        raise ExportError(f"--shard-size {options.shard_bytes}: give a positive number of bytes")
    if options.to == "hf" and options.columns and HF_IMAGE_COLUMN in options.columns:
        raise ExportError(f"--columns names {HF_IMAGE_COLUMN!r}, the column the Hugging Face layout adds itself; "
                          "leave it out")


# --- selection ---------------------------------------------------------------------------------


class Selection:
    """The rows of an index batch an export holds: ``status = 'ok'`` and ``--where`` (DuckDB,
    external access off), each in its split by a stable hash of its id."""

    def __init__(self, options: ExportOptions, index_columns: list[str] | None = None):
        self.where = options.where
        self.index_columns = index_columns  # named in a bad --where's message (default: the batch's)
        self.split_names = [name for name, _ in options.splits] or [DEFAULT_SPLIT]
        self._bounds = np.cumsum([fraction for _, fraction in options.splits]) if options.splits else None
        self._con: Any = None

    def select(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ok = batch.filter(pc.equal(batch.column("status"), STATUS_OK))
        if not self.where or not ok.num_rows:
            return ok
        return ok.filter(pc.is_in(ok.column("row"), pa.array(self._where_rows(ok), pa.int64())))

    def _where_rows(self, batch: pa.RecordBatch) -> Any:
        import duckdb

        if self._con is None:
            self._con = duckdb.connect(config={"enable_external_access": False})
            self._con.execute("SET enable_progress_bar = false")
        try:
            self._con.register("idx", batch)
            return self._con.execute(f"SELECT row FROM idx WHERE ({self.where})").fetchnumpy()["row"]
        except duckdb.Error as exc:
            first_line = str(exc).splitlines()[0]
            raise ExportError(
                f"--where {self.where!r}: {first_line}. Write a SQL condition over the index columns "
                f"({', '.join(self.index_columns or batch.schema.names)}), e.g. \"not blank and duplicate_of is null\""
            ) from None
        finally:
            self._con.unregister("idx")

    def columns_read(self, names: list[str], also: Iterable[str]) -> list[str] | None:
        """The index columns (of ``names``) to read to select rows and give ``also``: ``also``
        and every column ``--where`` may name — each whose name is a word of its text, matched
        without case as DuckDB matches names (a superset: the condition reads every column it
        uses). None (every column) when ``--where`` holds ``*`` or ``COLUMNS(…)``, which name
        columns by pattern."""
        if self.where and re.search(r"\*|\bcolumns\s*\(", self.where, re.IGNORECASE):
            return None
        named = [n for n in names if self.where and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", self.where, re.IGNORECASE)]
        return list(dict.fromkeys([*also, *named]))

    def splits_of(self, ids: pa.Array) -> np.ndarray:
        """Each id's split number: where the first 8 bytes of its sha256, as a fraction of
        2**64, fall among the splits' cumulative fractions."""
        if self._bounds is None:
            return np.zeros(len(ids), dtype=np.int64)
        position = np.array([int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") for i in ids.to_pylist()],
                            dtype=np.float64) / 2.0**64
        return np.minimum(np.searchsorted(self._bounds, position, side="right"), len(self._bounds) - 1)

    def in_split(self, batch: pa.RecordBatch, split: str) -> pa.RecordBatch:
        if self._bounds is None:
            return batch
        return batch.filter(pa.array(self.splits_of(batch.column("id")) == self.split_names.index(split)))


# --- the plan ----------------------------------------------------------------------------------


class OutputShard(BaseModel):
    """One output object: the selected rows of ``split`` among manifest rows first … last."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str
    number: int
    of: int
    first_row: int
    last_row: int
    rows: int
    bytes: int

    def key(self, to: str, split_folders: bool) -> str:
        if to == "hf":
            return f"data/{self.split}-{self.number:05d}-of-{self.of:05d}.parquet"
        return f"{self.split}/shard-{self.number:06d}.tar" if split_folders else f"shard-{self.number:06d}.tar"

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}"


class ExportPlan(BaseModel):
    """An export's output shards and what they are of: the first pass's result, stored as
    ``DEST/.sdbatch-export/plan.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: str  # the job's
    index_source: str  # index.parquet, or the commits read while the job is unfinished
    index_rows: int
    options: ExportOptions
    columns: tuple[str, ...]  # the index columns written, in order
    schema_b64: str  # their Arrow schema (one for every shard: ``datasets`` loads the shards as one table)
    classes: tuple[str, ...] = ()  # --class-column's values, sorted: class i is classes[i]
    shards: tuple[OutputShard, ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema_b64)))

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def key(self, shard: OutputShard) -> str:
        return shard.key(self.options.to, bool(self.options.splits))


class _SplitCutter:
    """Cuts one split's rows, in row order, into shards of about ``shard_bytes`` each: a row
    goes to shard ⌊(bytes of the split's rows before it) / shard_bytes⌋ (at most one row over)."""

    def __init__(self, shard_bytes: int):
        self.shard_bytes, self.before = shard_bytes, 0
        self.cuts: dict[int, list[int]] = {}  # shard → [first row, last row, rows, bytes]

    def add(self, rows: np.ndarray, sizes: np.ndarray) -> None:
        ends = self.before + np.cumsum(sizes)
        shards = (ends - sizes) // self.shard_bytes
        self.before = int(ends[-1])
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            cut = self.cuts.setdefault(shard, [int(rows[mine][0]), 0, 0, 0])
            cut[1:] = [int(rows[mine][-1]), cut[2] + int(mine.sum()), cut[3] + int(sizes[mine].sum())]

    def shards(self, split: str) -> list[OutputShard]:
        cuts = [self.cuts[k] for k in sorted(self.cuts)]
        return [OutputShard(split=split, number=n, of=len(cuts), first_row=c[0], last_row=c[1], rows=c[2], bytes=c[3])
                for n, c in enumerate(cuts)]


def plan_export(job: JobRecord, index: JobIndex, options: ExportOptions) -> ExportPlan:
    """One streaming pass over ``index``: the output shards of the rows ``options`` select.
    Holds a record batch and a few numbers per output shard, never the selection. From
    ``index.parquet`` it reads only the columns that select, split and size the rows (the
    output's schema is the file's); from the commits of an unfinished job, every column (each
    commit's types are its own)."""
    selection = Selection(options, index.column_names)
    cutters = {name: _SplitCutter(options.shard_bytes) for name in selection.split_names}
    classes: set[str] = set()
    schema: pa.Schema | None = None
    columns: list[str] | None = None
    read: list[str] | None = None
    if index.schema is not None:
        columns = _output_columns(index.schema, options)
        read = selection.columns_read(index.schema.names, [*_PLANNING_COLUMNS, *([options.class_column] if options.class_column else [])])
    chosen_any = False
    for batch in index.batches(read):
        if columns is None:
            columns = _output_columns(batch.schema, options)
        chosen = selection.select(batch)
        if not chosen.num_rows:
            continue
        chosen_any = True
        if index.schema is None:
            out_schema = chosen.select(columns).schema
            schema = out_schema if schema is None or schema == out_schema else pa.unify_schemas(
                [schema, out_schema], promote_options="permissive")
        if options.class_column:
            classes |= _class_values(chosen, options.class_column)
        numbers, sizes = chosen.column("row").to_numpy(), chosen.column("bytes").fill_null(0).to_numpy()
        split_of = selection.splits_of(chosen.column("id"))
        for number, name in enumerate(selection.split_names):
            mine = split_of == number
            if mine.any():
                cutters[name].add(numbers[mine], sizes[mine])
    if index.schema is not None and chosen_any and columns is not None:
        schema = pa.schema([index.schema.field(c) for c in columns], metadata=index.schema.metadata)
    shards = [shard for name, cutter in cutters.items() for shard in cutter.shards(name)]
    if not shards or schema is None or columns is None:
        where = f" --where {options.where!r}" if options.where else ""
        raise ExportError(
            f"the export of {index.storage.url} would be empty: no row of its {index.num_rows} ({index.source}) "
            f"has an image (status 'ok'){' and matches' + where if where else ''}. Nothing was written; "
            "change --where (`sdbatch stats OUT` counts the rows by label)")
    return ExportPlan(fingerprint=job.fingerprint, index_source=index.source, index_rows=index.num_rows,
                      options=options, columns=tuple(columns), classes=tuple(sorted(classes)),
                      schema_b64=base64.b64encode(schema.serialize().to_pybytes()).decode(), shards=tuple(shards))


def _output_columns(schema: pa.Schema, options: ExportOptions) -> list[str]:
    """The index columns an export writes, in order: ``--columns`` (with the class column), or all."""
    names = schema.names
    wanted = list(options.columns or names)
    if options.class_column and options.class_column not in wanted:
        wanted.append(options.class_column)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        what = "--class-column" if unknown == [options.class_column] and options.class_column not in (options.columns or ()) else "--columns"
        raise ExportError(f"{what}: no column {', '.join(map(repr, unknown))} in the index; its columns are "
                          f"{', '.join(names)}")
    if options.to == "hf" and HF_IMAGE_COLUMN in wanted:
        raise ExportError(f"the index has a column named {HF_IMAGE_COLUMN!r}, which the Hugging Face layout adds "
                          "itself; leave it out with --columns, or rename that manifest column")
    return wanted


def _class_values(batch: pa.RecordBatch, column: str) -> set[str]:
    values = batch.column(column)
    if values.null_count:
        raise ExportError(f"--class-column {column!r}: {values.null_count} selected rows have no value in it (row "
                          f"{batch.filter(pc.is_null(values)).column('row')[0]}); leave them out with "
                          f"--where \"{column} is not null\"")
    found = {str(v) for v in pc.unique(values).to_pylist()}
    if len(found) > MAX_CLASSES:
        raise ExportError(f"--class-column {column!r} has over {MAX_CLASSES} distinct values: not a class label")
    return found


# --- writing one output shard ------------------------------------------------------------------


class ShardTask(BaseModel):
    """Everything a task needs to write one output shard, wherever it runs (plain values; the
    plan without its list of shards)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str
    dest: str
    endpoint_url: str | None
    plan: ExportPlan
    shard: OutputShard


class ShardResult(BaseModel):
    """What a task did: rows written (0 if refused), and the mismatched rows it met (the first
    ``MAX_ROWS_NAMED``) with their count."""

    model_config = ConfigDict(extra="forbid")

    shard: OutputShard
    written: bool
    rows: int
    mismatched: list[tuple[str, str, str]] = []
    mismatched_count: int = 0


def _hf_features(plan: ExportPlan) -> bytes:
    """The schema metadata ``datasets`` reads its features from: ``image`` an Image, the class
    column a ClassLabel; the other columns are inferred from their Arrow types."""
    features: dict[str, Any] = {HF_IMAGE_COLUMN: {"_type": "Image"}}
    if plan.options.class_column:
        features[plan.options.class_column] = {"_type": "ClassLabel", "names": list(plan.classes)}
    return json.dumps({"info": {"features": features}}).encode()


class _ShardFile:
    """One output shard being written to a local file, a slice of checked rows at a time."""

    def __init__(self, plan: ExportPlan):
        self.plan = plan
        self.class_column = plan.options.class_column
        self.classes = pa.array(plan.classes, pa.string())

    def _class_numbers(self, rows: pa.RecordBatch) -> pa.Array:
        return pc.index_in(pc.cast(rows.column(self.class_column), pa.string()), value_set=self.classes)

    def add(self, rows: pa.RecordBatch, images: list[bytes], exts: list[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ParquetShard(_ShardFile):
    def __init__(self, plan: ExportPlan, path: Path):
        super().__init__(plan)
        fields = [pa.field(HF_IMAGE_COLUMN, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
        fields += [pa.field(f.name, pa.int64()) if f.name == self.class_column else f for f in plan.schema]
        self.schema = pa.schema(fields, metadata={b"huggingface": _hf_features(plan)})
        self.writer = pq.ParquetWriter(path, self.schema)
        self.group: list[pa.Table] = []
        self.group_bytes = 0

    def add(self, rows: pa.RecordBatch, images: list[bytes], exts: list[str]) -> None:
        names = [f"{rid}.{ext}" for rid, ext in zip(rows.column("id").to_pylist(), exts)]
        image = pa.StructArray.from_arrays([pa.array(images, pa.binary()), pa.array(names, pa.string())],
                                           names=["bytes", "path"])
        arrays = [image] + [self._class_numbers(rows).cast(pa.int64()) if f.name == self.class_column
                            else rows.column(f.name).cast(f.type) for f in list(self.schema)[1:]]
        self.group.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self.group_bytes += sum(map(len, images))
        if self.group_bytes >= ROW_GROUP_BYTES or sum(t.num_rows for t in self.group) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.group:
            table = pa.concat_tables(self.group)
            self.writer.write_table(table, row_group_size=table.num_rows)
        self.group, self.group_bytes = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()


class _TarShard(_ShardFile):
    def __init__(self, plan: ExportPlan, path: Path):
        import webdataset

        super().__init__(plan)
        self.writer = webdataset.TarWriter(str(path))

    def add(self, rows: pa.RecordBatch, images: list[bytes], exts: list[str]) -> None:
        records = rows.select(list(self.plan.columns)).to_pylist()
        numbers = self._class_numbers(rows).to_pylist() if self.class_column else [None] * len(records)
        for rid, record, image, ext, number in zip(rows.column("id").to_pylist(), records, images, exts, numbers):
            sample = {"__key__": webdataset_key(rid), ext: image,
                      "json": json.dumps(record, sort_keys=True, default=str).encode()}
            if number is not None:
                sample["cls"] = str(number).encode()
            self.writer.write(sample)

    def close(self) -> None:
        self.writer.close()


def _image_ext(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def write_shard(task: ShardTask) -> ShardResult:
    """Write one output shard and then its marker, from its own range of the index: select its
    rows again, read and check each image, write the object through a local temporary file.
    A shard that meets bytes other than its rows' images is not written (unless
    ``skip_mismatched``: those rows are left out). Runs in a Ray task or in process."""
    plan, shard = task.plan, task.shard
    source = open_storage(task.out, endpoint_url=task.endpoint_url)
    job, index = _open_job_index(source)
    if job.fingerprint != plan.fingerprint or index.source != plan.index_source:
        raise ExportError(f"{task.out} changed since this export was planned ({plan.index_source} of job "
                          f"{plan.fingerprint[:12]}…, now {index.source} of {job.fingerprint[:12]}…); export to a new DEST")
    layout = layout_for(source, job.job_spec.output)
    selection = Selection(plan.options, index.column_names)
    mismatched: list[tuple[str, str, str]] = []
    count = written_rows = 0
    needed = selection.columns_read(index.column_names, [*_WORKING_COLUMNS, *plan.columns])
    with tempfile.TemporaryDirectory(prefix="sdbatch-export-") as tmp:
        path = Path(tmp) / "shard"
        out = (_ParquetShard if plan.options.to == "hf" else _TarShard)(plan, path)
        for batch in index.batches(needed, rows=(shard.first_row, shard.last_row)):
            chosen = selection.in_split(selection.select(batch), shard.split)
            for start in range(0, chosen.num_rows, ROWS_PER_SLICE):
                rows = chosen.slice(start, ROWS_PER_SLICE)
                keep, images, exts = [], [], []
                for entry in rows.select(list(_WORKING_COLUMNS)).to_pylist():
                    data = layout.read(entry["key"])
                    problem = differs(entry, data)
                    keep.append(problem is None)
                    if problem is None:
                        images.append(data)
                        exts.append(_image_ext(entry["key"]))
                    else:
                        count += 1
                        if len(mismatched) < MAX_ROWS_NAMED:
                            mismatched.append((entry["id"], entry["key"], problem))
                if images and not (count and not plan.options.skip_mismatched):
                    out.add(rows.filter(pa.array(keep)), images, exts)
                    written_rows += len(images)
        out.close()
        if count and not plan.options.skip_mismatched:
            return ShardResult(shard=shard, written=False, rows=0, mismatched=mismatched, mismatched_count=count)
        dest = open_storage(task.dest, endpoint_url=task.endpoint_url)
        dest.put_file(plan.key(shard), path)
    marker = {"rows": written_rows, "left_out": [list(m) for m in mismatched], "left_out_count": count}
    dest.put(f"{DONE_PREFIX}{shard.name}.json", json.dumps(marker).encode())
    return ShardResult(shard=shard, written=True, rows=written_rows, mismatched=mismatched, mismatched_count=count)


# --- the export --------------------------------------------------------------------------------

#: Runs ``write_shard`` over tasks (in Ray tasks, say), yielding each result as it comes.
TaskRunner = Callable[[Callable[[ShardTask], ShardResult], list[ShardTask]], Iterable[ShardResult]]


def in_process(fn: Callable[[ShardTask], ShardResult], tasks: list[ShardTask]) -> Iterator[ShardResult]:
    return map(fn, tasks)


class Exported(BaseModel):
    """What an export holds once done: its rows and shards, the rows it left out, where."""

    rows: int
    shards: int
    written_now: int  # shards this run wrote (the rest were there from an interrupted run)
    left_out: int
    dest: str


def _resume_or_claim(dest: Storage, plan: ExportPlan) -> None:
    """Store the plan in an empty DEST, or go on with DEST's own unfinished export of exactly
    this plan; anything else there is refused, untouched."""
    try:
        stored = ExportPlan.model_validate_json(dest.get(PLAN_KEY))
    except NotFound:
        stored = None
    except ValueError:
        raise ExportError(f"{dest.url}/{PLAN_KEY} is not an export plan sdbatch wrote; choose a new DEST") from None
    if stored is None:
        if dest.list(""):
            raise ExportError(f"{dest.url} exists and is not empty; choose a new DEST or remove it")
        dest.put(PLAN_KEY, plan.model_dump_json(indent=1).encode())
    elif stored != plan:
        raise ExportError(f"{dest.url} holds another export (of other rows, options or another index: see "
                          f"{PLAN_KEY}); choose a new DEST, or rerun that export's own command to finish it")


def export(out: str, dest_location: str, options: ExportOptions, *, endpoint_url: str | None = None,
           run_tasks: TaskRunner | None = None, in_process_below: int = 0,
           on_shard: Callable[[int, int], None] | None = None) -> Exported:
    """Export the rows of OUT's index that ``options`` select to ``dest_location`` (a folder or
    ``s3://``), going on with an interrupted export there. Output shards are written by
    ``run_tasks`` (Ray tasks) unless it is None or the shards still to write hold fewer than
    ``in_process_below`` bytes (then here, one after another). ``on_shard(done, total)`` after each."""
    _check_options(options)
    source = open_storage(out, endpoint_url=endpoint_url)
    job, index = _open_job_index(source)
    if not index.final:
        log.warning("%s is unfinished: exporting its committed rows; duplicate_of is filled in only when the "
                    "job finishes", source.url)
    plan = plan_export(job, index, options)
    dest = open_storage(dest_location, endpoint_url=endpoint_url)
    _check_dest(dest, dest_location)
    _resume_or_claim(dest, plan)
    done = {key.removeprefix(DONE_PREFIX).removesuffix(".json") for key in dest.list(DONE_PREFIX)}
    slim = plan.model_copy(update={"shards": ()})  # a task needs its own shard only, not the whole list
    todo = [ShardTask(out=out, dest=dest_location, endpoint_url=endpoint_url, plan=slim, shard=shard)
            for shard in plan.shards if shard.name not in done]
    if done:
        log.info("%s: %d of %d output shards are already written; writing the other %d", dest.url,
                 len(plan.shards) - len(todo), len(plan.shards), len(todo))
    small = sum(t.shard.bytes for t in todo) < in_process_below or len(todo) <= 1
    runner: TaskRunner = in_process if run_tasks is None or small else run_tasks
    refused: list[ShardResult] = []
    for finished, result in enumerate(runner(write_shard, todo), start=len(plan.shards) - len(todo) + 1):
        if not result.written:
            refused.append(result)
        if on_shard is not None:
            on_shard(finished, len(plan.shards))
    if refused:
        _refuse(source.url, dest.url, refused, len(plan.shards))
    return _finish(dest, plan, len(todo))


def _check_dest(dest: Storage, location: str) -> None:
    local = Path(location)
    if "://" not in location and local.exists() and not local.is_dir():
        raise ExportError(f"{location} exists and is not a directory; choose a new DEST")


def _refuse(source_url: str, dest_url: str, refused: list[ShardResult], shards: int) -> None:
    rows = [row for result in refused for row in result.mismatched]
    count = sum(result.mismatched_count for result in refused)
    raise ImagesMismatched(
        f"{count} images in {source_url} are not the bytes their index rows recorded (size, sha256): "
        f"{name_rows(rows)}. The {len(refused)} of {shards} output shards holding them were not written to {dest_url} "
        "(the export is unfinished); `sdbatch verify OUT` lists them and `sdbatch submit ... --repair` regenerates "
        "them, then the same export command writes only the missing shards; or pass --skip-mismatched to leave them out"
    )


def _finish(dest: Storage, plan: ExportPlan, written_now: int) -> Exported:
    """Sum the shards' markers, warn of the rows left out, mark the export complete."""
    rows = left_out = 0
    named: list[tuple[str, str, str]] = []
    for key in dest.list(DONE_PREFIX):
        marker = json.loads(dest.get(key))
        rows += marker["rows"]
        left_out += marker["left_out_count"]
        named += [(m[0], m[1], m[2]) for m in marker["left_out"]]
    if left_out:
        log.warning("left out %d rows whose images are not the bytes their index rows recorded: %s",
                    left_out, name_rows(named))
    result = Exported(rows=rows, shards=len(plan.shards), written_now=written_now, left_out=left_out, dest=dest.url)
    dest.put(COMPLETE_KEY, result.model_dump_json().encode())
    return result


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a finished ``hf`` export folder to the Hub as dataset ``repo_id`` (created private
    if new) with the caller's token (``hf auth login`` or ``HF_TOKEN``); returns its URL. The
    export's own marks stay behind."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    again = f"the export at {folder} is complete: rerun the same command to push it"
    try:
        api.create_repo(repo_id, repo_type="dataset", private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder, ignore_patterns=[f"{MARK_DIR}/*"],
                          commit_message="sdbatch export")
    except LocalTokenNotFoundError:
        raise ExportError(f"--push-to {repo_id}: no Hugging Face token; log in with `hf auth login` or set "
                          f"HF_TOKEN. {again}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise ExportError(f"--push-to {repo_id}: the Hub refused the token (HTTP {status}); use a token that may "
                              f"write {repo_id} (`hf auth login`, HF_TOKEN). {again}") from None
        raise JobFailed(f"--push-to {repo_id}: the Hub answered HTTP {status}; {again}") from None
    except Exception as exc:  # noqa: BLE001 - huggingface_hub lets its HTTP client's own errors through
        raise JobFailed(f"--push-to {repo_id}: the Hub could not be reached ({type(exc).__name__}: {exc}); "
                        f"{again}") from None
    return f"https://huggingface.co/datasets/{repo_id}"
