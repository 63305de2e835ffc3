"""Reading manifest rows: record batches, ``Row`` values with the job's defaults applied, rows by
number, batch keys, the passthrough columns' types."""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.columns import BATCH_KEY, COLUMNS, CONDITIONAL, KNOWN_COLUMNS, Column
from sdbatch.data.controlnets import IMAGE_SEPARATOR
from sdbatch.data.loras import row_loras
from sdbatch.data.row import Row, default_row_id, derive_seed
from sdbatch.manifest.sources import (
    IGNORED_PREFIX,
    Manifest,
    ManifestChanged,
    ManifestError,
    open_parquet,
    parquet_file,
    pin_file,
    s3_identity,
)
from sdbatch.spec import JobSpec
from sdbatch.storage.locations import has_scheme, is_remote, is_s3


def resolve_init_image(value: str, base_dir: str) -> str:
    """``init_image`` as a location: URIs (``s3://…``) as given, local paths made absolute
    relative to the manifest's ``base_dir``."""
    if has_scheme(value):
        return value
    if is_remote(base_dir):
        return posixpath.normpath(base_dir.rstrip("/") + "/" + value.lstrip("/")).replace(":/", "://", 1)
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def resolve_images(column: Column, value: str, base_dir: str) -> str:
    """An image column's value as locations: each image it names (``Column.image_locations``;
    control_image: several separated by ``IMAGE_SEPARATOR``) resolved as ``resolve_init_image`` does."""
    return IMAGE_SEPARATOR.join(resolve_init_image(part, base_dir) for part in column.image_locations(value))


def iter_row_batches(
    manifest: Manifest, columns: list[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Every row of the manifest, file after file, as record batches of at most ``batch_size``
    rows (memory is bounded by one batch). ``columns`` limits what is read."""
    for path in manifest.files:
        pf = parquet_file(path, streaming=True)
        if pf.metadata.num_rows == 0:
            continue
        yield from guarded_batches(pf, path, batch_size, columns)


def guarded_batches(pf: pq.ParquetFile, path: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """``iter_batches`` that turns a corrupt page into a ManifestError naming the file and row."""
    it = pf.iter_batches(batch_size=batch_size, columns=columns, use_threads=True)
    done = 0
    while True:
        try:
            rb = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{path}: cannot read the rows after row {done} of this file (corrupt Parquet?): {exc}") from None
        done += rb.num_rows
        yield rb


def plain_array(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def column_pylist(arr: pa.Array, column: str, first_row: int) -> list[Any]:
    arr = plain_array(arr)
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:
        binary = arr.cast(pa.large_binary()) if pa.types.is_large_string(arr.type) else arr.cast(pa.binary())
        for i, v in enumerate(binary.to_pylist()):
            if v is not None:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    raise ManifestError(
                        f"row {first_row + i}, column {column!r}: invalid UTF-8 text; run `sdbatch validate`"
                    ) from None
        raise


class ManifestReader:
    """A manifest kept open for reading row ranges (a worker holds one for the whole job).

    Each file is opened, and its footer read, once — on the first range that touches it —
    and its content checked against the pin the job was planned with (``Manifest.file_pins``:
    a local file hashed through the handle its rows are read from, an ``s3://`` object's ETag);
    after each read a local file's size and modification time and an ``s3://`` object's ETag are
    checked again, so a manifest replaced or rewritten since ``open_manifest`` is refused
    (``ManifestChanged``) instead of generating rows nobody validated. Not thread-safe: one
    thread reads.
    """

    def __init__(self, manifest: Manifest, endpoint_url: str | None = None):
        self.manifest = manifest
        self.endpoint_url = endpoint_url  # for s3:// files (else AWS_ENDPOINT_URL[_S3], as boto3)
        self._files: dict[int, pq.ParquetFile] = {}
        self._handles: dict[int, tuple[pa.NativeFile, Any]] = {}  # and what tells the file is unchanged

    def _file(self, number: int) -> pq.ParquetFile:
        pf = self._files.get(number)
        if pf is None:
            path = self.manifest.files[number]
            pf, handle = open_parquet(path, endpoint_url=self.endpoint_url)
            pin = pin_file(path, pf, hashlib.sha256(), handle, self.endpoint_url)
            self._handles[number] = (handle, self._witness(number, handle))
            self._refuse_unless(number, pin == self.manifest.file_pins[number])
            self._files[number] = pf
        return pf

    def _witness(self, number: int, handle: pa.NativeFile) -> Any:
        """What cheaply tells an opened file is still the one that was pinned: a local file's size
        and modification time, an ``s3://`` object's identity (None for other remote files: their
        pin is checked at open)."""
        path = self.manifest.files[number]
        if is_s3(path):
            return s3_identity(path, self.endpoint_url)
        if is_remote(path):
            return None
        st = os.fstat(handle.fileno())
        return st.st_size, st.st_mtime_ns

    def _check_unchanged(self, number: int) -> None:
        handle, witness = self._handles[number]
        self._refuse_unless(number, self._witness(number, handle) == witness)

    def _refuse_unless(self, number: int, unchanged: bool) -> None:
        if not unchanged:
            raise ManifestChanged(
                f"{self.manifest.files[number]}: the manifest changed while the job ran (its content is not "
                f"the one pinned when the job opened it, fingerprint {self.manifest.fingerprint}); no row "
                "was generated from the changed file — restore the manifest and run the same command again, "
                "or submit the new one as a new job (another --out, or --new-run)"
            )

    def read_rows(self, spec: JobSpec, start: int, stop: int) -> list[Row]:
        """Rows ``[start, stop)`` as ``Row``s, with job defaults applied.

        Only the row groups overlapping the range are read (found from the Parquet footers),
        so the cost depends on the range, not on the manifest's size. A null in an optional
        column means "use the job default"; a missing seed is derived with ``derive_seed``;
        ``strength`` is set only for img2img rows (row value or ``defaults.strength``, which an
        instruction-edit model leaves null: its rows have none),
        ``refiner_switch`` only in a job with ``model.refiner``. Passthrough columns go into ``Row.extra`` as plain Python values (``to_pylist``). The
        rows are assumed to have passed ``validate_manifest``.
        """
        manifest = self.manifest
        if not (0 <= start <= stop <= manifest.num_rows):
            raise ManifestError(f"row range [{start}, {stop}) is outside the manifest's 0..{manifest.num_rows} rows")
        columns = [c for c in manifest.columns if not c.startswith(IGNORED_PREFIX)]
        out: list[Row] = []
        file_start = 0
        for number, path in enumerate(manifest.files):
            if file_start >= stop:
                break
            nrows = manifest.file_rows[number] if manifest.file_rows else self._file(number).metadata.num_rows
            lo, hi = max(start, file_start), min(stop, file_start + nrows)
            if lo < hi:
                pf = self._file(number)
                md = pf.metadata
                groups: list[int] = []
                first = None
                rg_start = file_start
                for g in range(md.num_row_groups):
                    n = md.row_group(g).num_rows
                    if rg_start < hi and rg_start + n > lo:
                        groups.append(g)
                        if first is None:
                            first = rg_start
                    rg_start += n
                try:
                    table = pf.read_row_groups(groups, columns=columns, use_threads=False)
                except (pa.ArrowException, OSError) as exc:
                    self._check_unchanged(number)  # rewritten under the reader, rather than corrupt
                    raise ManifestError(f"{path}: cannot read row groups {groups} (corrupt Parquet?): {exc}") from None
                self._check_unchanged(number)  # the rows just read are the pinned ones
                assert first is not None  # lo < hi: a row group holds row lo
                table = table.slice(lo - first, hi - lo)
                out.extend(_rows_from_table(table, lo, manifest, spec))
            file_start += nrows
        return out


    def read_rows_at(self, spec: JobSpec, numbers: range | Sequence[int]) -> list[Row]:
        """The rows numbered ``numbers`` (a shard's rows), in that order. Rows closer together
        than ``_READ_GAP_ROWS`` are read as one range, so a shard of interleaved rows costs a
        few reads, not one per row."""
        if isinstance(numbers, range) and numbers.step == 1:
            return self.read_rows(spec, numbers.start, numbers.stop)
        wanted = set(numbers)
        ordered = sorted(wanted)
        found: dict[int, Row] = {}
        lo = 0
        for i in range(1, len(ordered) + 1):
            if i == len(ordered) or ordered[i] - ordered[i - 1] > _READ_GAP_ROWS:
                span = self.read_rows(spec, ordered[lo], ordered[i - 1] + 1)
                found.update((r.index, r) for r in span if r.index in wanted)
                lo = i
        return [found[n] for n in numbers]


#: rows read per step by ``iter_batch_keys``, and the largest gap between a shard's rows that
#: ``read_rows_at`` reads through rather than starting a new read
_KEY_CHUNK_ROWS = 65_536


_READ_GAP_ROWS = 4_096


def read_rows(manifest: Manifest, spec: JobSpec, start: int, stop: int) -> list[Row]:
    """Rows ``[start, stop)`` of ``manifest`` (see ``ManifestReader.read_rows``), opening its
    files for this one read."""
    return ManifestReader(manifest).read_rows(spec, start, stop)


def read_rows_at(manifest: Manifest, spec: JobSpec, numbers: range | Sequence[int]) -> list[Row]:
    """The rows numbered ``numbers`` of ``manifest`` (see ``ManifestReader.read_rows_at``)."""
    return ManifestReader(manifest).read_rows_at(spec, numbers)


def iter_batch_keys(manifest: Manifest, spec: JobSpec) -> Iterator[tuple] | None:
    """Every row's ``Row.batch_key()`` in manifest order, read in chunks (bounded memory);
    None when the manifest has no batch-key column, so every row has the spec's key."""
    if not set(BATCH_KEY) & set(manifest.columns):
        return None
    reader = ManifestReader(manifest)
    return (
        row.batch_key()
        for start in range(0, manifest.num_rows, _KEY_CHUNK_ROWS)
        for row in reader.read_rows(spec, start, min(start + _KEY_CHUNK_ROWS, manifest.num_rows))
    )


#: Columns whose null is not simply "the job default" (read_rows resolves them itself).
_RESOLVED_COLUMNS = ("id", "prompt", "seed", "init_image", "strength", "loras", "refiner_switch")


def _rows_from_table(table: pa.Table, first_row: int, manifest: Manifest, spec: JobSpec) -> list[Row]:
    n = table.num_rows
    cols = {name: column_pylist(table.column(name), name, first_row) for name in table.column_names}
    d = spec.defaults
    none = [None] * n
    plain: dict[str, list[Any]] = {}
    for column in COLUMNS:
        if column.name not in _RESOLVED_COLUMNS:
            default, convert = getattr(d, column.name, None), column.canonical or column.python_type
            if column.image:  # a conditioning image is a location, resolved as init_image is
                convert = partial(resolve_images, column, base_dir=manifest.base_dir)
            plain[column.name] = [convert(v) if v is not None else default for v in cols.get(column.name, none)]
    for column in CONDITIONAL:  # None where the column does not apply (hires_strength without hires_scale)
        on = column.applies_when.row_column if column.applies_when else None
        if column.name in plain and on is not None:
            given = plain[on] if on in plain else cols.get(on, none)
            plain[column.name] = [v if given[i] is not None else None for i, v in enumerate(plain[column.name])]
    ids, prompts, seeds, inits, strengths, loras, switches = (cols.get(name, none) for name in _RESOLVED_COLUMNS)
    refined = spec.model.refiner is not None
    extra_names = [c for c in table.column_names if c not in KNOWN_COLUMNS]
    rows = []
    for i in range(n):
        index = first_row + i
        rid = str(ids[i]) if ids[i] is not None else default_row_id(index)
        init = inits[i]
        init_loc = resolve_init_image(init, manifest.base_dir) if init is not None else None
        prompt, adapters = row_loras(prompts[i], loras[i], spec.loras)
        rows.append(
            Row(
                index=index,
                id=rid,
                prompt=prompt,
                seed=int(seeds[i]) if seeds[i] is not None else derive_seed(spec.seed, rid),
                init_image=init_loc,
                strength=(float(strengths[i]) if strengths[i] is not None else d.strength)  # None: an edit model
                if init_loc is not None
                else None,
                loras=adapters,
                refiner_switch=(float(switches[i]) if switches[i] is not None else float(d.refiner_switch))
                if refined
                else None,
                extra={name: cols[name][i] for name in extra_names},
                **{name: values[i] for name, values in plain.items()},
            )
        )
    return rows


def passthrough_types(manifest: Manifest) -> dict[str, pa.DataType]:
    """The passthrough columns' Arrow types, as the index keeps them."""
    return {c: manifest.schema.field(c).type for c in manifest.passthrough_columns}
