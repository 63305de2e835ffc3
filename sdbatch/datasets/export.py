"""``sdbatch export``: a finished job's images and index rows, filtered, in a training format.

* ``hf``: a Hugging Face ``imagefolder`` — ``DIR/images/<id>.<ext>`` and ``DIR/metadata.parquet``
  (``file_name`` plus every index column: prompt, seed, parameters, labels, quality columns),
  which ``datasets.load_dataset(DIR)`` loads with an ``image`` column.
* ``webdataset``: ``DIR/shard-NNNNNN.tar`` re-sharded by size (``webdataset.ShardWriter``);
  each sample is ``<key>.<ext>`` + ``<key>.json`` (the index row).

Rows are selected with ``--where``, a SQL boolean expression over the index columns
(``"not blank and duplicate_of is null"``) evaluated by DuckDB on the index alone, with file
and network access switched off; only rows whose image exists (``status = 'ok'``) are
exported. Each image's bytes are checked against the size and sha256 its index row recorded as
they are copied: an export holding any other bytes is refused (``ImagesMismatched``, exit 5,
naming the rows; nothing is published), or with ``skip_mismatched`` those rows are left out
and named in a warning. ``hf`` refuses ids that differ only by case (``A``, ``a``): their
files would overwrite each other on a case-insensitive filesystem. OUT may be local or
``s3://``. No torch here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdbatch.data.index import JOB_KEY, STATUS_OK
from sdbatch.errors import BadInput, JobFailed
from sdbatch.output.commits import OutputMismatch
from sdbatch.output.documents import JobRecord
from sdbatch.output.index import read_index
from sdbatch.output.layout import Layout, differs, layout_for, webdataset_key
from sdbatch.storage.base import Storage

log = logging.getLogger("sdbatch.export")


FORMATS = ("hf", "webdataset")
#: Columns the Hugging Face imagefolder layout adds itself; an index column of that name would clash.
HF_OWN_COLUMNS = ("image", "file_name")
DEFAULT_SHARD_BYTES = 1 << 30
MAX_ROWS_NAMED = 20


class ExportError(BadInput, ValueError):
    """Bad input to ``sdbatch export`` (no job at OUT, a bad --where, a DIR in use)."""


class ImagesMismatched(JobFailed):
    """Stored images whose bytes are not the ones their index rows recorded (exit 5)."""


def name_rows(rows: list[tuple[str, str, str]], limit: int = MAX_ROWS_NAMED) -> str:
    """``id key (what differs)`` of each row, the first ``limit`` of them."""
    named = "; ".join(f"{rid} {key} ({what})" for rid, key, what in rows[:limit])
    return named + (f"; … and {len(rows) - limit} more" if len(rows) > limit else "")


def load_index(storage: Storage) -> tuple[pa.Table, bool, Layout]:
    """The job's index — the final one, else what is committed so far —, whether it is the
    final one (only that one has ``duplicate_of`` filled in), and its images' layout."""
    job = JobRecord.read(storage)
    if job is None:
        raise ExportError(f"no sdbatch job at {storage.url} (no {JOB_KEY})")
    try:
        table, shards_merged = read_index(storage, job.fingerprint)
    except OutputMismatch as exc:  # a commit this job did not write: not exported
        raise ExportError(str(exc)) from None
    return table, shards_merged is None, layout_for(storage, job.job_spec.output)


def select_rows(index: pa.Table, where: str | None) -> pa.Table:
    """The index rows ``where`` (a DuckDB SQL boolean expression) holds for, in row order."""
    if not where:
        return index
    import duckdb

    con = duckdb.connect(config={"enable_external_access": False})
    try:
        con.execute("SET enable_progress_bar = false")
        con.register("idx", index)
        rows = con.execute(f"SELECT row FROM idx WHERE ({where})").fetchnumpy()["row"]
    except duckdb.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ExportError(
            f"--where {where!r}: {first_line}. Write a SQL condition over the index columns "
            f"({', '.join(index.column_names)}), e.g. \"not blank and duplicate_of is null\""
        ) from None
    finally:
        con.close()
    return index.filter(pc.is_in(index.column("row"), pa.array(rows, pa.int64())))


def ok_rows(rows: pa.Table) -> pa.Table:
    return rows.filter(pc.equal(rows.column("status"), STATUS_OK))


def iter_images(layout: Layout, rows: pa.Table) -> Iterator[tuple[dict[str, Any], bytes, str | None]]:
    """Each ok row with its image bytes and how they differ from what the row recorded (None:
    they are its image). The layout reads a webdataset tar once for its rows."""
    for entry in ok_rows(rows).to_pylist():
        data = layout.read(entry["key"])
        yield entry, data, differs(entry, data)


class _Matching:
    """The images an export copies: only those whose bytes are the rows' own; the others are
    collected (id, key, what differs) for ``settle``."""

    def __init__(self, layout: Layout, rows: pa.Table):
        self.layout, self.rows = layout, rows
        self.mismatched: list[tuple[str, str, str]] = []

    def __iter__(self) -> Iterator[tuple[dict[str, Any], bytes]]:
        for entry, data, problem in iter_images(self.layout, self.rows):
            if problem:
                self.mismatched.append((entry["id"], entry["key"], problem))
            else:
                yield entry, data

    def settle(self, skip_mismatched: bool) -> None:
        """Before publishing: refuse an export that met other bytes, or say which rows it left out."""
        if not self.mismatched:
            return
        count, url = len(self.mismatched), self.layout.storage.url
        if not skip_mismatched:
            raise ImagesMismatched(
                f"{count} images in {url} are not the bytes their index rows recorded (size, sha256): "
                f"{name_rows(self.mismatched)}. Nothing was exported. `sdbatch verify OUT` lists them and "
                "`sdbatch submit ... --repair` regenerates them; or pass --skip-mismatched to export the rest"
            )
        log.warning("left out %d rows whose images in %s are not the bytes their index rows recorded: %s",
                    count, url, name_rows(self.mismatched))


def case_collisions(ids: list[str]) -> list[list[str]]:
    """Groups of ``ids`` that name the same file on a case-insensitive filesystem (macOS,
    Windows): equal after Unicode normalisation and case folding."""
    groups: dict[str, list[str]] = {}
    for rid in ids:
        groups.setdefault(unicodedata.normalize("NFC", rid).casefold(), []).append(rid)
    return [group for group in groups.values() if len(group) > 1]


def _image_ext(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fresh_dir(dest: Path) -> Path:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty directory; choose a new DIR or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def _publish(tmp: Path, dest: Path) -> None:
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)


def export_hf(layout: Layout, rows: pa.Table, dest: Path, skip_mismatched: bool = False) -> int:
    clash = [c for c in HF_OWN_COLUMNS if c in rows.column_names]
    if clash:
        raise ExportError(f"the index has a column named {clash[0]!r}, which the Hugging Face layout adds itself; "
                          "rename that manifest column")
    collisions = case_collisions(ok_rows(rows).column("id").to_pylist())
    if collisions:
        shown = ", ".join(" / ".join(group) for group in collisions[:MAX_ROWS_NAMED])
        raise ExportError(
            f"ids that differ only by case would be one file under {dest}/images on a case-insensitive filesystem "
            f"(macOS, Windows): {shown}{' …' if len(collisions) > MAX_ROWS_NAMED else ''}. Leave all but one of "
            f"each out with --where (e.g. \"id <> '{collisions[0][-1]}'\"), or export with --to webdataset"
        )
    tmp = _fresh_dir(dest)
    try:
        (tmp / "images").mkdir()
        kept: list[int] = []
        names: list[str] = []
        images = _Matching(layout, rows)
        for entry, data in images:
            name = f"images/{entry['id']}.{_image_ext(entry['key'])}"
            (tmp / name).write_bytes(data)
            kept.append(entry["row"])
            names.append(name)
        images.settle(skip_mismatched)
        table = rows.filter(pc.is_in(rows.column("row"), pa.array(kept, pa.int64())))
        pq.write_table(table.add_column(0, "file_name", pa.array(names, pa.string())), tmp / "metadata.parquet")
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(kept)


def export_webdataset(layout: Layout, rows: pa.Table, dest: Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
                      skip_mismatched: bool = False) -> int:
    import webdataset

    tmp = _fresh_dir(dest)
    count = 0
    try:
        images = _Matching(layout, rows)
        with webdataset.ShardWriter(str(tmp / "shard-%06d.tar"), maxsize=shard_bytes, verbose=0) as writer:
            for entry, data in images:
                writer.write({
                    "__key__": webdataset_key(entry["id"]),
                    _image_ext(entry["key"]): data,
                    "json": json.dumps(entry, sort_keys=True, default=str).encode(),
                })
                count += 1
        images.settle(skip_mismatched)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return count


def export(storage: Storage, to: str, dest: Path, where: str | None = None,
           shard_bytes: int = DEFAULT_SHARD_BYTES, skip_mismatched: bool = False) -> int:
    """Export the rows of OUT's index that ``where`` selects to ``dest``; returns how many.
    ``skip_mismatched``: leave out rows whose stored bytes are not their recorded image
    (else ``ImagesMismatched``)."""
    if to not in FORMATS:
        raise ExportError(f"--to {to!r}: use one of {', '.join(FORMATS)}")
    index, final, layout = load_index(storage)
    if not final:
        log.warning("%s is unfinished: exporting its committed rows; duplicate_of is filled in only when the "
                    "job finishes", storage.url)
    rows = select_rows(index, where)
    if to == "hf":
        return export_hf(layout, rows, dest, skip_mismatched)
    return export_webdataset(layout, rows, dest, shard_bytes, skip_mismatched)
