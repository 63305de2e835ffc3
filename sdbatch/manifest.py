"""Manifest reading and validation, and the ``Row`` value type.

A ``Row`` is one manifest row with every job default already applied. It flows from the
manifest reader through planning and batching to the generator and into the metadata
record, so it holds only plain, serialisable values.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import numpy as np
import os
import posixpath
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from sdbatch.data.columns import BATCH_KEY, COLUMN, Column, COLUMNS, DEFAULTED, KNOWN_COLUMNS, suggest
from sdbatch.data.index import RESERVED_COLUMNS
from sdbatch.data.loras import LoraError, row_loras
from sdbatch.data.row import default_row_id, derive_seed, ID_PATTERN, MAX_SEED, Row
from sdbatch.data.samplers import SCHEDULERS
from sdbatch.documents import JOB_KEY
from sdbatch.errors import BadInput
from sdbatch.models.families import Family
from sdbatch.spec import JobSpec
from sdbatch.storage.base import check_uri, TMP_MARK
from sdbatch.storage.s3_client import s3_endpoint


#: Columns pandas writes for a non-default index; they are neither checked nor passed through.
_IGNORED_PREFIX = "__index_level_"


_GLOB_CHARS = "*?["


class ManifestError(BadInput, ValueError):
    """A manifest that cannot be read at all (missing, not Parquet, empty, no prompt column).

    Row-level problems are not raised: ``validate_manifest`` reports them as ``RowIssue``s.
    """


class ManifestChanged(ManifestError):
    """A manifest file whose content is not the one the job pinned when it opened the manifest:
    replaced or rewritten while the job ran. Every shard would read it alike, so the driver
    stops the job (exit 2) instead of generating rows nobody validated."""


@dataclass(frozen=True)
class Manifest:
    """What ``open_manifest`` learns from the Parquet footers, without reading any row.

    ``files`` are absolute local paths (or ``scheme://`` URIs), sorted; rows are numbered
    0.. across the files in that order. ``file_rows`` holds each file's row count,
    ``file_pins`` each file's pin (``_pin_file``), which every reader checks when it opens it.
    """

    source: str
    files: tuple[str, ...]
    num_rows: int
    columns: tuple[str, ...]
    fingerprint: str
    base_dir: str
    file_rows: tuple[int, ...] = ()
    file_pins: tuple[str, ...] = ()
    schema: pa.Schema = pa.schema([])  # the first file's Arrow schema

    @property
    def passthrough_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c not in KNOWN_COLUMNS and not c.startswith(_IGNORED_PREFIX))


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file_scheme(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _remote_fs(uri: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem for a URI. For ``s3://`` the endpoint is ``endpoint_url``, else
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (as boto3 reads them), so an
    S3-compatible store (MinIO, moto) works on the driver and on every worker alike."""
    import pyarrow.fs as pafs

    endpoint = s3_endpoint(endpoint_url)
    try:
        if uri.startswith("s3://") and endpoint:
            from urllib.parse import urlparse

            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            fs = pafs.S3FileSystem(
                endpoint_override=ep.netloc,
                scheme=ep.scheme or "https",
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            )
            return fs, uri[len("s3://") :]
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - any filesystem error is a bad source
        raise ManifestError(f"cannot open manifest location {uri}: {exc}") from None


def _open_input(path: str, endpoint_url: str | None = None) -> pa.NativeFile:
    """A readable file for a local path or a URI."""
    if _is_uri(path):
        fs, p = _remote_fs(path, endpoint_url)
        return fs.open_input_file(p)
    return pa.OSFile(path)


def _parquet_file(path: str, streaming: bool = False, endpoint_url: str | None = None) -> pq.ParquetFile:
    return _open_parquet(path, streaming, endpoint_url)[0]


def _open_parquet(path: str, streaming: bool = False,
                  endpoint_url: str | None = None) -> tuple[pq.ParquetFile, pa.NativeFile]:
    """``path`` as a ParquetFile, and the file handle it reads (what ``_pin_file`` hashes)."""
    # streaming: no pre-buffering — Arrow's pre-buffer cache keeps every range it read
    # alive for the reader's lifetime, which grows with the file (≈ 25 bytes/row).
    opts: dict[str, Any] = {"pre_buffer": False, "buffer_size": 1 << 20} if streaming else {}
    try:
        handle = _open_input(path, endpoint_url)
        return pq.ParquetFile(handle, **opts), handle
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        size = _size_or_none(path)
        if size == 0:
            raise ManifestError(
                f"{path}: the file is empty (0 bytes), not a Parquet file; "
                "write the manifest with pyarrow/pandas `to_parquet`, or use `sdbatch manifest`"
            ) from None
        raise ManifestError(
            f"{path}: not a readable Parquet file ({exc}); a manifest must be Parquet — "
            "convert CSV/JSONL with `sdbatch manifest --from FILE`"
        ) from None


def _size_or_none(path: str) -> int | None:
    try:
        if _is_uri(path):
            fs, p = _remote_fs(path)
            return fs.get_file_info(p).size
        return os.path.getsize(path)
    except Exception:  # noqa: BLE001
        return None


def _hidden(rel: str) -> bool:
    """Paths Spark/Hadoop/pandas leave beside data files (``_SUCCESS``, ``.crc``, ``_temporary/``)."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_local(source: str) -> tuple[list[str], str]:
    source = _strip_file_scheme(source)
    if any(ch in source for ch in _GLOB_CHARS) and not os.path.exists(source):
        # base: the leading part of the pattern without glob characters
        parts = []
        for part in Path(source).parts:
            if any(ch in part for ch in _GLOB_CHARS):
                break
            parts.append(part)
        base = os.path.abspath(os.path.join(*parts)) if parts else os.getcwd()
        matches = sorted(
            p
            for p in (os.path.abspath(m) for m in glob.glob(source, recursive=True))
            if os.path.isfile(p) and not _hidden(os.path.relpath(p, base).replace(os.sep, "/"))
        )
        if not matches:
            raise ManifestError(f"manifest glob {source!r} matches no files")
        return matches, base
    if os.path.isdir(source):
        base = os.path.abspath(source)
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            if os.path.exists(os.path.join(dirpath, JOB_KEY)):  # an sdbatch OUT: its index is no manifest
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for name in filenames:
                if name.endswith(".parquet") and not name.startswith((".", "_")):
                    found.append(os.path.join(dirpath, name))
        if not found:
            raise ManifestError(f"manifest directory {source} holds no .parquet files")
        found.sort(key=lambda p: os.path.relpath(p, base).replace(os.sep, "/"))
        return found, base
    if os.path.isfile(source):
        path = os.path.abspath(source)
        return [path], os.path.dirname(path)
    raise ManifestError(f"manifest {source}: no such file or directory")


def _list_remote(source: str) -> tuple[list[str], str]:
    import fnmatch

    import pyarrow.fs as pafs

    scheme, _, rest = source.partition("://")
    fs, path = _remote_fs(source if not any(c in source for c in _GLOB_CHARS) else source.split("*")[0])

    def uri(p: str) -> str:
        return f"{scheme}://{p}"

    if any(ch in rest for ch in _GLOB_CHARS):
        prefix = rest
        cut = min(prefix.find(c) for c in _GLOB_CHARS if c in prefix)
        base = prefix[:cut].rsplit("/", 1)[0]
        fs, base_path = _remote_fs(uri(base))
        infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True, allow_not_found=True))
        matches = sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatchcase(i.path, rest)
            and not _hidden(i.path[len(base_path) :].lstrip("/"))
        )
        if not matches:
            raise ManifestError(f"manifest glob {source!r} matches no files")
        return [uri(m) for m in matches], uri(base)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [source], source.rsplit("/", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    base = path.rstrip("/")
    rels = [i.path[len(base) :].lstrip("/") for i in infos if i.type == pafs.FileType.File]
    outs = tuple(rel[: -len(JOB_KEY)] for rel in rels if rel == JOB_KEY or rel.endswith("/" + JOB_KEY))
    found = [(rel, f"{base}/{rel}") for rel in rels
             if rel.endswith(".parquet") and not _hidden(rel) and not rel.startswith(outs)]
    if not found:
        raise ManifestError(f"manifest {source}: no such object, and no .parquet files under that prefix")
    found.sort()
    return [uri(p) for _, p in found], uri(base)


def _s3_identity(uri: str, endpoint_url: str | None = None) -> str:
    """An s3:// file's ETag and version id: a content change of any kind changes the ETag."""
    from sdbatch.storage.base import StorageError
    from sdbatch.storage.open import object_identity

    try:
        return object_identity(uri, endpoint_url=endpoint_url)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest file {uri}: {exc}") from None


def _pin_file(path: str, pf: pq.ParquetFile, fingerprint: Any, handle: pa.NativeFile,
              endpoint_url: str | None = None) -> str:
    """One manifest file's pin, also fed into ``fingerprint`` (the manifest's hash): for an
    ``s3://`` file its ETag and version id, for another remote file the sha256 of its size and
    complete footer, for a local file the sha256 of its bytes, read through ``handle`` — the
    one its rows are then read from, so a file replaced after the check is never read."""
    if path.startswith("s3://"):
        identity = _s3_identity(path, endpoint_url)
        fingerprint.update(f"s3:{identity}\0".encode())
        return f"s3:{identity}"
    if _is_uri(path):
        sink = pa.BufferOutputStream()
        pf.metadata.write_metadata_file(sink)
        described = f"size:{_size_or_none(path)}\0".encode() + sink.getvalue().to_pybytes()
        fingerprint.update(described)
        return f"footer:{hashlib.sha256(described).hexdigest()}"
    own = hashlib.sha256()
    handle.seek(0)
    while chunk := handle.read(1 << 22):  # ~1.5 GB/s
        fingerprint.update(chunk)
        own.update(chunk)
    return f"sha256:{own.hexdigest()}"


def open_manifest(source: str) -> Manifest:
    """Resolve ``source`` (a Parquet file, a directory of ``.parquet`` files, or a glob; local or
    ``s3://``) and read the Parquet footers only.

    Directories are searched recursively for ``*.parquet``; glob matches may have any name.
    Both skip paths with a component starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``,
    ``_temporary/``) and are ordered by path. ``base_dir`` — what relative ``init_image``
    paths are relative to — is the file's folder, the directory itself, or a glob's leading
    folder without wildcards.

    The fingerprint is a SHA-256 over every file's pin (``_pin_file``: its bytes, streamed
    at ~1.5 GB/s; an ``s3://`` object's ETag and version id — any content change changes the
    ETag; another remote file's size and complete Parquet footer) and, for several files, their
    relative names. Each file's own pin is kept (``Manifest.file_pins``) for the readers.
    """
    source = check_uri(str(source), "manifest")
    if _is_uri(source):
        try:
            files, base_dir = _list_remote(source)
        except OSError as exc:  # pyarrow's S3 errors: endpoint unreachable, access denied, no bucket
            raise ManifestError(
                f"manifest {source}: cannot list or read it ({type(exc).__name__}: {exc}); fix: check the URI, "
                "the endpoint (--s3-endpoint or AWS_ENDPOINT_URL) and the credentials"
            ) from None
    else:
        files, base_dir = _list_local(source)
    columns: tuple[str, ...] | None = None
    schema: pa.Schema | None = None
    file_rows: list[int] = []
    file_pins: list[str] = []
    h = hashlib.sha256(b"sdbatch-manifest-v1\0")
    for path in files:
        pf, handle = _open_parquet(path)
        names = tuple(pf.schema_arrow.names)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ManifestError(f"{path}: column name(s) {dupes} appear more than once; rename them")
        if "prompt" not in names:
            hint = ""
            close = [n for n in names if n.lower().strip() in ("prompt", "prompts", "text", "caption")]
            if close:
                hint = f" (rename {close[0]!r} to 'prompt')"
            raise ManifestError(
                f"{path}: the required column 'prompt' is missing{hint}; columns present: "
                f"{', '.join(names) or '(none)'}"
            )
        if columns is None:
            columns, schema = names, pf.schema_arrow
        elif set(names) != set(columns):
            missing = sorted(set(columns) - set(names))
            extra = sorted(set(names) - set(columns))
            raise ManifestError(
                f"{path}: its columns differ from {files[0]} (missing {missing}, extra {extra}); "
                "every file of a manifest must have the same columns"
            )
        file_rows.append(pf.metadata.num_rows)
        if len(files) > 1:
            rel = path[len(base_dir) :].lstrip("/\\") if path.startswith(base_dir) else path
            h.update(f"file:{rel}\0".encode())
        file_pins.append(_pin_file(path, pf, h, handle))
        handle.close()
    num_rows = sum(file_rows)
    if num_rows == 0:
        raise ManifestError(
            f"manifest {source} has no rows ({len(files)} file(s), all empty); add at least one row"
        )
    return Manifest(
        source=source,
        files=tuple(files),
        num_rows=num_rows,
        columns=tuple(columns or ()),
        fingerprint=h.hexdigest()[:16],
        base_dir=base_dir,
        file_rows=tuple(file_rows),
        file_pins=tuple(file_pins),
        schema=schema,
    )


def resolve_init_image(value: str, base_dir: str) -> str:
    """``init_image`` as a location: URIs (``s3://…``) as given, local paths made absolute
    relative to the manifest's ``base_dir``."""
    if "://" in value:
        return value
    if _is_uri(base_dir):
        return posixpath.normpath(base_dir.rstrip("/") + "/" + value.lstrip("/")).replace(":/", "://", 1)
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _s3_bucket(uri: str) -> str:
    return uri[len("s3://"):].partition("/")[0]


@dataclass(frozen=True)
class InitImagePlaces:
    """Where a job reads init images from: local folders (symlinks resolved) and ``s3://`` prefixes."""

    local: tuple[str, ...]
    s3: tuple[str, ...]

    def resolve(self, where: str) -> tuple[str, bool]:
        """A resolved ``init_image`` location as it is read (local: symlinks resolved) and
        whether it lies in one of the places."""
        if where.startswith("s3://"):
            return where, any(where.startswith(r) for r in self.s3)
        where = os.path.realpath(_strip_file_scheme(where))
        return where, any(where == r or where.startswith(r.rstrip(os.sep) + os.sep) for r in self.local)

    def __str__(self) -> str:
        return ", ".join([*self.local, *self.s3])


def init_image_places(base_dir: str | None, spec: JobSpec, job_locations: list[str]) -> InitImagePlaces:
    """Where the job already reads and writes: the manifest's folder (``base_dir``), the buckets
    of ``job_locations`` (its output, model, manifest), plus what ``limits.init_image_roots`` adds."""
    roots = [*([base_dir] if base_dir else []), *spec.limits.init_image_roots]
    s3_roots = [f"s3://{_s3_bucket(loc)}/" for loc in job_locations if loc.startswith("s3://")]
    return InitImagePlaces(
        local=tuple(os.path.realpath(os.path.expanduser(_strip_file_scheme(r))) for r in roots if not _is_uri(r)),
        s3=tuple(s3_roots + [r.rstrip("/") + "/" for r in spec.limits.init_image_roots if r.startswith("s3://")]),
    )


def check_init_image_roots(manifest: Manifest, spec: JobSpec, job_locations: list[str], shown: int = 20) -> None:
    """Init images are read only from the job's ``init_image_places`` (``job_locations``: its
    output and model; the manifest is added here). ManifestError naming each row outside
    (symlinks resolved)."""
    if "init_image" not in manifest.columns:
        return
    places = init_image_places(manifest.base_dir, spec, [*job_locations, manifest.source])
    columns = ["init_image"] + (["id"] if "id" in manifest.columns else [])
    problems: list[str] = []
    row = 0
    for rb in iter_row_batches(manifest, columns=columns):
        values = _pylist(rb.column(0), "init_image", row)
        ids = _pylist(rb.column(1), "id", row) if len(columns) > 1 else [default_row_id(row + i) for i in range(len(values))]
        for i, value in enumerate(values):
            if value is None:
                continue
            where, inside = places.resolve(resolve_init_image(value, manifest.base_dir))
            if not inside and len(problems) < shown:
                problems.append(f"  row {row + i} (id {ids[i]}): init_image {value!r} resolves to {where}")
        row += len(values)
    if problems:
        raise ManifestError(
            f"init images outside the places this job reads from ({places}):\n"
            + "\n".join(problems) + "\nMove them under the manifest's folder, or allow their folder or bucket "
            "explicitly with --set 'limits.init_image_roots=[\"/path/or/s3://bucket/prefix\"]'; nothing was written"
        )


def iter_row_batches(
    manifest: Manifest, columns: list[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Every row of the manifest, file after file, as record batches of at most ``batch_size``
    rows (memory is bounded by one batch). ``columns`` limits what is read."""
    for path in manifest.files:
        pf = _parquet_file(path, streaming=True)
        if pf.metadata.num_rows == 0:
            continue
        yield from _guarded_batches(pf, path, batch_size, columns)


def _guarded_batches(pf: pq.ParquetFile, path: str, batch_size: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
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


def _decode(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _pylist(arr: pa.Array, column: str, first_row: int) -> list[Any]:
    arr = _decode(arr)
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
            pf, handle = _open_parquet(path, endpoint_url=self.endpoint_url)
            pin = _pin_file(path, pf, hashlib.sha256(), handle, self.endpoint_url)
            self._handles[number] = (handle, self._witness(number, handle))
            self._refuse_unless(number, pin == self.manifest.file_pins[number])
            self._files[number] = pf
        return pf

    def _witness(self, number: int, handle: pa.NativeFile) -> Any:
        """What cheaply tells an opened file is still the one that was pinned: a local file's size
        and modification time, an ``s3://`` object's identity (None for other remote files: their
        pin is checked at open)."""
        path = self.manifest.files[number]
        if path.startswith("s3://"):
            return _s3_identity(path, self.endpoint_url)
        if _is_uri(path):
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
        ``strength`` is set only for img2img rows (row value or ``defaults.strength``),
        ``refiner_switch`` only in a job with ``model.refiner``. Passthrough columns go into ``Row.extra`` as plain Python values (``to_pylist``). The
        rows are assumed to have passed ``validate_manifest``.
        """
        manifest = self.manifest
        if not (0 <= start <= stop <= manifest.num_rows):
            raise ManifestError(f"row range [{start}, {stop}) is outside the manifest's 0..{manifest.num_rows} rows")
        columns = [c for c in manifest.columns if not c.startswith(_IGNORED_PREFIX)]
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
    cols = {name: _pylist(table.column(name), name, first_row) for name in table.column_names}
    d = spec.defaults
    none = [None] * n
    plain: dict[str, list[Any]] = {}
    for column in COLUMNS:
        if column.name not in _RESOLVED_COLUMNS:
            default, convert = getattr(d, column.name, None), column.python_type
            plain[column.name] = [convert(v) if v is not None else default for v in cols.get(column.name, none)]
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
                strength=(float(strengths[i]) if strengths[i] is not None else float(d.strength))
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


@dataclass
class RowIssue:
    """One broken rule. ``row`` is the 0-based manifest row (as in default ids); -1 marks a
    problem of the job spec itself (a default that breaks a rule), ``column`` then names the
    spec key. A column of the wrong type is reported once per file, at the file's first row."""

    row: int
    id: str | None
    column: str
    value: str  # repr of the offending value, truncated to about 80 characters
    rule: str
    fix: str

    def render(self) -> str:
        if self.row < 0:
            where = "job spec"
        else:
            where = f"row {self.row}" + (f" (id {_repr_value(self.id)})" if self.id is not None else "")
        return f"{where}, column {self.column!r}: value {self.value} — rule: {self.rule} — fix: {self.fix}"


@dataclass
class ValidationReport:
    num_rows: int
    issues: list[RowIssue] = field(default_factory=list)  # the first limits.max_errors_shown, by row
    issue_count: int = 0  # every issue found
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # not errors: see validate_manifest(strict=)

    @property
    def ok(self) -> bool:
        return self.issue_count == 0

    def render(self) -> str:
        s = self.summary
        lines = [f"manifest: {s.get('source', '?')} ({s.get('files', 1)} file(s), fingerprint {s.get('fingerprint', '?')})"]
        lines.append(f"  rows: {self.num_rows:,}  (numbered from 0, as in default ids)")
        if "distinct_prompts" in s:
            approx = " (approximate, ±1%)" if s.get("distinct_prompts_approximate") else ""
            lines.append(f"  distinct prompts: {s['distinct_prompts']:,}{approx}")

        def top(d: dict, k: int = 8) -> str:
            items = sorted(d.items(), key=lambda kv: (-kv[1], str(kv[0])))
            text = ", ".join(f"{key}: {cnt:,}" for key, cnt in items[:k])
            return text + (f", … ({len(items) - k} more)" if len(items) > k else "")

        for key, label in (("sizes", "sizes"), ("steps", "steps"), ("guidance_scale", "guidance"), ("schedulers", "schedulers")):
            if s.get(key):
                lines.append(f"  {label}: {top(s[key])}")
        if "img2img_rows" in s:
            lines.append(f"  img2img rows: {s['img2img_rows']:,}")
        if "seeds" in s:
            lines.append(f"  seeds: {s['seeds']}")
        if "ids" in s:
            lines.append(f"  ids: {s['ids']}")
        pt = s.get("passthrough_columns") or {}
        lines.append("  passthrough columns: " + (", ".join(f"{k} ({v})" for k, v in pt.items()) if pt else "(none)"))
        lines.extend(f"warning: {w}" for w in self.warnings)
        if self.ok:
            lines.append("OK: the manifest is valid")
            return "\n".join(lines)
        lines.append(f"  rows with errors: {s.get('bad_rows', '?'):,}" if isinstance(s.get("bad_rows"), int) else "")
        lines.append("")
        lines.extend(issue.render() for issue in self.issues)
        lines.append("")
        plural = "error" if self.issue_count == 1 else "errors"
        lines.append(f"{self.issue_count:,} {plural} in total (first {len(self.issues)} shown)")
        return "\n".join(line for line in lines if line is not None)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    return "other"


def _repr_value(v: Any, limit: int = 80) -> str:
    if isinstance(v, (str, bytes)) and len(v) > limit - 20:
        r = repr(v[: limit - 24])
        return f"{r[:-1]}…{r[-1]} ({len(v):,} {'chars' if isinstance(v, str) else 'bytes'})"
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _value_at(arr: pa.Array, i: int) -> str:
    try:
        v = arr[i].as_py()
    except UnicodeDecodeError:
        raw = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())[i].as_py()
        return _repr_value(raw) + " (invalid UTF-8)"
    return _repr_value(v)


_P = np.uint64(0x100000001B3)


_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))


_powers: dict[str, np.ndarray] = {"p": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}


def _pow_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if len(_powers["p"]) < n + 1:
        size = min(max(n + 1, 2 * len(_powers["p"])), _HASH_SLICE_BYTES + 1)
        p = np.full(size, _P, dtype=np.uint64)
        p[0] = 1
        inv = np.full(size, _P_INV, dtype=np.uint64)
        inv[0] = 1
        with np.errstate(over="ignore"):
            _powers["p"] = np.cumprod(p, dtype=np.uint64)
            _powers["inv"] = np.cumprod(inv, dtype=np.uint64)
    return _powers["p"], _powers["inv"]


_HASH_SLICE_BYTES = 1 << 20  # bounds the per-byte temporaries (8 bytes per text byte, a few arrays)


def _hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of every string of ``arr`` (nulls hash like ''): a polynomial hash
    modulo 2**64 (made position-independent with the modular inverse of the odd base),
    then the splitmix64 finaliser. Rows are hashed in slices of about 1 MiB of text; a
    single longer string is hashed with blake2b. Collisions only cost a re-check; they are
    never trusted."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    bufs = arr.buffers()
    otype = np.int32 if pa.types.is_string(arr.type) else np.int64
    offs = np.frombuffer(bufs[1], dtype=otype)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    s = 0
    while s < n:
        e = int(np.searchsorted(offs, offs[s] + _HASH_SLICE_BYTES, side="right")) - 1
        e = min(max(e, s), n)
        if e == s:  # one string longer than a slice
            raw = data[offs[s] : offs[s + 1]].tobytes()
            out[s] = np.uint64(int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little"))
            s += 1
            continue
        out[s:e] = _poly_hash(data, offs[s : e + 1])
        s = e
    return out


def _poly_hash(data: np.ndarray, offs: np.ndarray) -> np.ndarray:
    lo, hi = int(offs[0]), int(offs[-1])
    d = data[lo:hi]
    rel = offs - lo
    pw, inv = _pow_tables(len(d))
    with np.errstate(over="ignore"):
        cs = np.zeros(len(d) + 1, dtype=np.uint64)
        v = d.astype(np.uint64)
        v += np.uint64(1)
        v *= pw[: len(d)]
        np.cumsum(v, out=cs[1:])
        del v
        starts, ends = rel[:-1], rel[1:]
        h = (cs[ends] - cs[starts]) * inv[starts]
        h ^= (ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


class _DistinctCounter:
    """Distinct count of 64-bit hashes: exact up to K values, then the K-minimum-values
    estimate (relative error about 1/sqrt(K) ≈ 0.4%)."""

    K = 1 << 16

    def __init__(self) -> None:
        self.kept = np.zeros(0, np.uint64)
        self.saturated = False

    def add(self, hashes: np.ndarray) -> None:
        if len(hashes) == 0:
            return
        if self.saturated:
            hashes = hashes[hashes < self.kept[-1]]
        merged = np.union1d(self.kept, hashes)
        if len(merged) > self.K:
            self.saturated = True
            merged = merged[: self.K]
        self.kept = merged

    def estimate(self) -> tuple[int, bool]:
        if not self.saturated:
            return len(self.kept), False
        kth = float(self.kept[-1]) / 2.0**64
        return int(round((self.K - 1) / kth)), True


class _Counts:
    """Value counts for the summary, capped in size."""

    CAP = 10_000

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        keys, cnts = np.unique(values, return_counts=True)
        for k, c in zip(keys.tolist(), cnts.tolist()):
            if k in self.counts or len(self.counts) < self.CAP:
                self.counts[k] = self.counts.get(k, 0) + c


class _Collector:
    """Counts every issue; keeps the first ``limit`` by (row, column) order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: list[RowIssue] = []
        self.count = 0
        self._col_order = {c: i for i, c in enumerate(KNOWN_COLUMNS)}

    def full_before(self, row: int) -> bool:
        return len(self.kept) >= self.limit and self.kept[-1].row < row

    def _sort(self) -> None:
        self.kept.sort(key=lambda x: (x.row, self._col_order.get(x.column, 99)))
        del self.kept[self.limit :]

    def add(self, issue: RowIssue) -> None:
        self.count += 1
        self.kept.append(issue)
        self._sort()


class _Batch:
    """One record batch under validation: its columns, decoded, and issue bookkeeping."""

    def __init__(self, rb: pa.RecordBatch, base: int, skip: set[str], coll: _Collector) -> None:
        self.base = base
        self.n = rb.num_rows
        self.cols: dict[str, pa.Array] = {}
        for name in rb.schema.names:
            if name in KNOWN_COLUMNS and name not in skip:
                self.cols[name] = _decode(rb.column(name))
        self.coll = coll
        self.id_unknown = "id" in skip  # an id column of the wrong type: don't show a made-up id
        self.bad = np.zeros(self.n, dtype=bool)
        self._ids: pa.Array | None = None

    def ids(self) -> pa.Array | None:
        if self._ids is None and "id" in self.cols:
            a = self.cols["id"]
            self._ids = a if _kind(a.type) == "string" else a.cast(pa.string())
        return self._ids

    def id_at(self, i: int) -> str | None:
        ids = self.ids()
        if ids is None:
            return None if self.id_unknown else default_row_id(self.base + i)
        try:
            v = ids[i].as_py()
        except UnicodeDecodeError:
            return None
        return v

    def flag(self, column: str, mask: Any, rule: str, fix: str | Callable[[Any], str], values: pa.Array | None = None) -> None:
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = mask.fill_null(False).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return
        self.bad[idx] = True
        coll = self.coll
        coll.count += len(idx)
        values = values if values is not None else self.cols.get(column)
        for i in idx[: coll.limit].tolist():
            if coll.full_before(self.base + i):
                break
            value = _value_at(values, i) if values is not None else "None"
            coll.kept.append(
                RowIssue(
                    row=self.base + i,
                    id=self.id_at(i),
                    column=column,
                    value=value,
                    rule=rule,
                    fix=fix(values[i].as_py() if values is not None else None) if callable(fix) else fix,
                )
            )
        coll._sort()


def _np(arr: pa.Array, fill: Any, dtype: Any) -> np.ndarray:
    if arr.null_count:
        arr = arr.fill_null(pa.scalar(fill, arr.type) if not pa.types.is_null(arr.type) else fill)
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _check_text(b: _Batch, column: str, limits: Any, required: bool) -> pa.Array | None:
    """Checks shared by prompt and negative_prompt; returns the array with invalid-UTF-8
    rows nulled (safe for further string kernels), or None when the column is absent."""
    arr = b.cols.get(column)
    if arr is None:
        return None
    if pa.types.is_null(arr.type):
        if required:
            b.flag(column, np.ones(b.n, bool), f"{column} is required: every row needs a non-null text",
                   "give every row a prompt (or drop rows without one)", arr)
        return None
    nulls = arr.is_null()
    arr = _check_utf8(b, column, arr)  # rows with invalid UTF-8 become null from here on
    if required:
        b.flag(column, nulls, f"{column} is required: every row needs a non-null text",
               "give every row a prompt (or drop rows without one)", arr)
        lengths = pc.utf8_length(arr)
        empty = pc.or_(pc.equal(lengths, 0), pc.utf8_is_space(arr))
        b.flag(column, empty, f"{column} must not be empty or only whitespace", "write a prompt, or drop the row", arr)
    else:
        lengths = pc.utf8_length(arr)
    limit = limits.max_prompt_chars
    b.flag(
        column,
        pc.greater(lengths, limit),
        f"at most {limit:,} characters (limits.max_prompt_chars)",
        "shorten the text (the text encoder reads only its first 77 tokens) or raise the limit: --set limits.max_prompt_chars=N",
        arr,
    )
    b.flag(column, pc.match_substring(arr, "\x00"), "no NUL characters (\\x00) in text",
           "remove the NUL characters (often a sign of binary data or a broken export)", arr)
    return arr


def _check_utf8(b: _Batch, column: str, arr: pa.Array) -> pa.Array:
    try:
        arr.validate(full=True)
        return arr
    except pa.ArrowInvalid:
        pass
    binary = arr.cast(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    bad = np.zeros(len(arr), dtype=bool)
    for i, v in enumerate(binary.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    b.flag(
        column,
        bad,
        "text must be valid UTF-8 (no lone surrogates U+D800–U+DFFF, no broken byte sequences)",
        "re-encode the text as UTF-8 and remove lone surrogate characters",
        arr,
    )
    cleaned = pc.if_else(pa.array(bad), pa.scalar(None, arr.type), arr)
    b.cols[column] = cleaned
    return cleaned


def _check_range(b: _Batch, column: Column, limits: Any) -> None:
    """A column's ``Range`` rule (column table) on every non-null value of the batch."""
    rule, arr, name = column.range, b.cols.get(column.name), column.name
    if rule is None or arr is None or pa.types.is_null(arr.type):
        return
    if rule.multiple_of:
        low_bits = pa.scalar(rule.multiple_of - 1, arr.type)  # multiple_of is a power of two
        b.flag(name, pc.not_equal(pc.bit_wise_and(arr, low_bits), pa.scalar(0, arr.type)),
               f"{name} must be a multiple of {rule.multiple_of}", f"round {name} to a multiple of {rule.multiple_of} (e.g. 512)")
    values, nonfinite = arr, None
    if rule.finite is not None:
        values = arr.cast(pa.float64())
        nonfinite = pc.or_(pc.is_nan(values), pc.is_inf(values))
        b.flag(name, nonfinite, f"{name} must be finite (no NaN or infinity)", rule.finite)
    hi = rule.upper(limits)
    hi = pa.scalar(hi, pa.uint64()) if pa.types.is_unsigned_integer(arr.type) else hi
    low_ok = pc.greater(values, rule.lo) if rule.lo_open else pc.greater_equal(values, rule.lo)
    high_ok = pc.less(values, hi) if rule.hi_open else pc.less_equal(values, hi)
    bad = pc.invert(pc.and_(low_ok, high_ok))  # NaN compares false: out of range
    if nonfinite is not None:
        bad = pc.and_(bad, pc.invert(nonfinite))  # already reported as not finite
    b.flag(name, bad, rule.text(name, limits), rule.fix_for)


def _check_loras(b: _Batch, prompts: pa.Array | None, declared: dict[str, str]) -> None:
    """The rows' adapter references (``loras`` column and ``<lora:…>`` prompt tags): well formed,
    declared by the job, one scale per adapter. Only rows that have any are looked at."""
    column = b.cols.get("loras")
    if column is not None and not pa.types.is_null(column.type):
        column = _check_utf8(b, "loras", column)
        given = pc.is_valid(column).to_numpy(zero_copy_only=False)
    else:
        column, given = None, np.zeros(b.n, dtype=bool)
    tagged = (pc.match_substring(prompts, "<lora:").fill_null(False).to_numpy(zero_copy_only=False)
              if prompts is not None else np.zeros(b.n, dtype=bool))
    for i in np.flatnonzero(given | tagged).tolist():
        value = column[i].as_py() if given[i] else None
        try:
            row_loras(prompts[i].as_py() if tagged[i] else "", value, declared)
        except LoraError as exc:
            name = "loras" if given[i] else "prompt"
            one = np.zeros(b.n, dtype=bool)
            one[i] = True
            b.flag(name, one, str(exc), "write NAME:SCALE entries (or <lora:NAME:SCALE> tags) naming declared adapters",
                   column if given[i] else prompts)


def _check_spec_defaults(spec: JobSpec, coll: _Collector, samplers: tuple[str, ...]) -> None:
    d, lim = spec.defaults, spec.limits

    def bad(key: str, value: Any, rule: str, fix: str) -> None:
        coll.add(RowIssue(-1, None, f"defaults.{key}", _repr_value(value), rule, fix))

    for column in DEFAULTED:
        rule, value = column.range, getattr(d, column.name)
        if rule is not None and not rule.accepts(value, lim):
            grid = f"a multiple of {rule.multiple_of} with " if rule.multiple_of else ""
            finite = "finite and " if rule.finite else ""
            raise_limit = f", or raise limits.{rule.hi}" if isinstance(rule.hi, str) else ""
            fix = rule.fix_for(value) if rule.low_fix else f"--set defaults.{column.name}={column.default}{raise_limit}"
            bad(column.name, value, f"{finite}{grid}{rule.text(column.name, lim)}", fix)
    if d.width * d.height > lim.max_pixels:
        bad("width", f"{d.width}x{d.height}", f"width*height <= {lim.max_pixels:,} (limits.max_pixels)",
            "choose a smaller default size or raise limits.max_pixels")
    if len(d.negative_prompt) > lim.max_prompt_chars or "\x00" in d.negative_prompt:
        bad("negative_prompt", d.negative_prompt, f"at most {lim.max_prompt_chars:,} characters, no NUL", "shorten it")
    if d.scheduler not in samplers:
        bad("scheduler", d.scheduler, f"one of {', '.join(samplers)} (the model's samplers)", "--set defaults.scheduler=default")


def _scheduler_fix(value: Any, samplers: tuple[str, ...]) -> str:
    names = ", ".join(samplers)
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower().replace("-", "_").replace(" ", "_"), samplers, n=1, cutoff=0.5)
        if close:
            return f"did you mean {close[0]!r}? supported: {names}"
    return f"use one of: {names} (or leave it null for the job default)"


def _unrecordable(t: pa.DataType) -> pa.DataType | None:
    """The part of a passthrough column's type that JSON (the image record) cannot hold faithfully."""
    if pa.types.is_dictionary(t):
        return _unrecordable(t.value_type)
    if any(test(t) for test in _UNRECORDABLE_TYPES):
        return t
    nested = (t.field(i).type for i in range(t.num_fields)) if pa.types.is_nested(t) else ()
    return next((u for u in map(_unrecordable, nested) if u is not None), None)


_UNRECORDABLE_TYPES = (pa.types.is_timestamp, pa.types.is_date, pa.types.is_time, pa.types.is_decimal,
                       pa.types.is_duration, pa.types.is_binary, pa.types.is_large_binary,
                       pa.types.is_fixed_size_binary, getattr(pa.types, "is_binary_view", lambda _: False))


def _check_passthrough_columns(manifest: Manifest, coll: _Collector, strict: bool) -> list[str]:
    """Passthrough columns that would break the index or the record are refused; names that look
    like a misspelled per-row column (``widht``) are warned about — refused with ``strict``."""
    warnings = []
    for name in manifest.passthrough_columns:
        t = manifest.schema.field(name).type
        if name in RESERVED_COLUMNS:
            coll.add(RowIssue(0, None, name, "a passthrough column",
                              f"passthrough column names must differ from the index's own columns ({', '.join(RESERVED_COLUMNS)})",
                              f"rename the column, e.g. to 'label_{name}'"))
        bad_type = _unrecordable(t)
        if bad_type is not None:
            coll.add(RowIssue(0, None, name, f"a passthrough column of type {t}",
                              f"passthrough values go into each image's JSON record, which has no faithful form for {bad_type}",
                              "cast the column to string before writing the manifest (ISO 8601 for dates and times; "
                              "pandas: df[col] = df[col].astype(str); pyarrow: pc.cast(col, pa.string())), or drop it"))
        close = suggest(name, KNOWN_COLUMNS)
        if close and close not in manifest.columns:
            text = f"column {name!r} is not a per-row column, so it is passed through as a label: did you mean {close!r}?"
            if strict:
                coll.add(RowIssue(0, None, name, "a passthrough column", f"{text} (--strict refuses it)",
                                  f"rename it to {close!r}, or to a label name not so close to a per-row column"))
            else:
                warnings.append(f"{text} Rename it, or pass --strict to refuse such columns.")
    return warnings


def _check_same_passthrough_types(manifest: Manifest, path: str, schema: pa.Schema, base: int, coll: _Collector) -> None:
    """Every file of a manifest gives each passthrough column the first file's type (a file where
    it is all-null is fine): the index is one table, typed by the first file."""
    for name in manifest.passthrough_columns:
        want, got = manifest.schema.field(name).type, schema.field(name).type
        if got != want and not pa.types.is_null(got):
            first, this = os.path.basename(manifest.files[0]), os.path.basename(path)
            coll.add(RowIssue(base, None, name, f"type {got} in {this}",
                              f"every file of a manifest must give passthrough column {name!r} one type "
                              f"({manifest.files[0]}: {want}; {path}: {got})",
                              f"write {name!r} with one type in every file ({first} has {want}, {this} has {got})"))


def validate_manifest(manifest: Manifest, spec: JobSpec, batch_size: int = 65_536, *, strict: bool = False,
                      family: Family | None = None) -> ValidationReport:
    """Check every row against DESIGN §2, streaming (one record batch in memory at a time).

    Semantics of nulls: a null in ``negative_prompt``, ``steps``, ``guidance_scale``,
    ``width``, ``height``, ``scheduler`` or ``strength`` means "the job default"; a null
    ``init_image`` makes the row text-to-image. A null ``prompt``, ``id`` or ``seed`` is an
    error — to derive seeds, leave the ``seed`` column out (a half-filled seed column is
    usually a broken join). Ranges are checked on the resolved values, and job defaults are
    checked once (reported with row -1 and the spec key).

    Duplicate ids are found with one 64-bit hash per row (8 bytes/row) sorted in numpy, then
    the first duplicates are confirmed by their actual strings in a second pass over ``id``.
    ``distinct prompts`` is exact up to 65,536 and a K-minimum-values estimate beyond.
    ``family`` (the model's, when known) limits the samplers rows may ask for.
    """
    lim, d = spec.limits, spec.defaults
    if d.width is None or d.height is None:
        raise ManifestError(f"the native size of model {spec.model.name!r} is not known here; "
                            "set defaults.width and defaults.height (--width/--height)")
    if len(manifest.columns) > lim.max_columns:  # before anything reads per column
        raise ManifestError(
            f"manifest {manifest.source} has {len(manifest.columns):,} columns, more than limits.max_columns "
            f"({lim.max_columns:,}): each column is a column of the index and a key of every image's record. Fix: "
            "write only the columns you need as labels, or raise the limit: --set limits.max_columns=N")
    samplers = family.samplers if family else SCHEDULERS
    coll = _Collector(lim.max_errors_shown)
    _check_spec_defaults(spec, coll, samplers)
    present = set(manifest.columns)
    read_cols = [c for c in KNOWN_COLUMNS if c in present]
    has_ids = "id" in present
    id_hashes = np.empty(manifest.num_rows if has_ids else 0, dtype=np.uint64)
    id_valid = np.zeros(manifest.num_rows if has_ids else 0, dtype=bool)
    prompts = _DistinctCounter()
    sizes, steps_c, cfg_c, sched_c = _Counts(), _Counts(), _Counts(), _Counts()
    img2img = 0
    bad_rows = 0
    base = 0
    warnings = _check_passthrough_columns(manifest, coll, strict)
    for path, nrows in zip(manifest.files, manifest.file_rows or [None] * len(manifest.files)):
        pf = _parquet_file(path, streaming=True)
        if pf.metadata.num_rows == 0:
            continue
        schema = pf.schema_arrow
        _check_same_passthrough_types(manifest, path, schema, base, coll)
        file_start = base
        skip: set[str] = set()
        for name in read_cols:
            column = COLUMN[name]
            found = _kind(schema.field(name).type)
            if found not in column.kinds and found != "null":
                skip.add(name)
                coll.add(RowIssue(base, None, name, f"a column of type {schema.field(name).type} "
                                  f"(all {pf.metadata.num_rows:,} rows of {os.path.basename(path)})",
                                  f"{name} must be {column.expected}", column.type_fix))
        cols = [c for c in read_cols if c not in skip]
        file_bad_all = bool(skip)
        for rb in _guarded_batches(pf, path, batch_size, cols):
            b = _Batch(rb, base, skip, coll)
            n = b.n
            # prompt / negative_prompt
            parr = _check_text(b, "prompt", lim, required=True)
            if parr is not None:
                valid = pc.is_valid(parr).to_numpy(zero_copy_only=False)
                prompts.add(np.unique(_hash_strings(parr)[valid]))
            _check_text(b, "negative_prompt", lim, required=False)
            # id
            ids = b.ids()
            if ids is not None:
                if pa.types.is_null(ids.type):
                    ids = pa.nulls(n, pa.string())
                raw = b.cols["id"]
                id_nulls = ids.is_null()
                if _kind(raw.type) == "string" and not pa.types.is_null(raw.type):
                    ids = _check_utf8(b, "id", ids)
                    b._ids = ids
                b.flag("id", id_nulls, "id must be set in every row when the id column is present",
                       "fill the id, or drop the id column to use row numbers", raw)
                nonnull = pc.is_valid(ids)
                dots = pc.or_(pc.equal(ids, "."), pc.equal(ids, ".."))
                b.flag("id", dots, "id must not be '.' or '..' (ids name output files)", "rename the row's id")
                pattern = pc.and_(nonnull, pc.invert(pc.match_substring_regex(ids, f"^{ID_PATTERN}$")))
                b.flag("id", pc.and_(pattern, pc.invert(dots)), f"id must match {ID_PATTERN} (ids name output files)",
                       "use only letters, digits, '.', '_' and '-', at most 128 characters", ids)
                b.flag("id", pc.match_substring(ids, TMP_MARK),
                       f"id must not contain {TMP_MARK!r} (ids name output files; storage reserves that mark for temporary files)",
                       f"rename the row's id without {TMP_MARK!r}", ids)
                id_hashes[base : base + n] = _hash_strings(ids)
                id_valid[base : base + n] = nonnull.to_numpy(zero_copy_only=False)
            # seed
            seed = b.cols.get("seed")
            if seed is not None:
                b.flag("seed", seed.is_null(), "seed must be set in every row when the seed column is present "
                       "(null is not 'derive')", "fill the seed, or drop the seed column so every row derives "
                       "its seed from the job seed and its id")
                if not pa.types.is_null(seed.type):
                    too_big = (pc.greater_equal(seed, pa.scalar(MAX_SEED, pa.uint64()))
                               if pa.types.is_unsigned_integer(seed.type) else pc.less(seed, 0))
                    b.flag("seed", too_big, "0 <= seed < 2**63", "use a seed in 0..9223372036854775807")
            # the range rules of the column table: steps, guidance_scale, width, height, strength, ...
            for column in COLUMNS:
                _check_range(b, column, lim)
            w = _np(b.cols["width"], d.width, np.float64) if b.cols.get("width") is not None and not pa.types.is_null(b.cols["width"].type) else np.full(n, float(d.width))
            h = _np(b.cols["height"], d.height, np.float64) if b.cols.get("height") is not None and not pa.types.is_null(b.cols["height"].type) else np.full(n, float(d.height))
            in_range = (w >= 64) & (w <= lim.max_width) & (h >= 64) & (h <= lim.max_height)
            over = in_range & (w * h > lim.max_pixels)
            if over.any():
                vals = pc.binary_join_element_wise(
                    pc.cast(pa.array(w.astype(np.int64)), pa.string()),
                    pc.cast(pa.array(h.astype(np.int64)), pa.string()),
                    "x",
                )
                b.flag("width", over, f"width*height <= {lim.max_pixels:,} pixels (limits.max_pixels)",
                       "use a smaller size, or raise the limit: --set limits.max_pixels=N", vals)
            ok_size = in_range & (w * h <= lim.max_pixels)
            sizes.add((w[ok_size].astype(np.int64) << 20) | h[ok_size].astype(np.int64))
            # guidance_scale
            g = b.cols.get("guidance_scale")
            if g is not None and not pa.types.is_null(g.type):
                gf = g.cast(pa.float64())
                gvals = _np(gf, float(d.guidance_scale), np.float64)
                cfg_c.add(gvals[np.isfinite(gvals) & (gvals >= 0) & (gvals <= lim.max_guidance)])
            else:
                cfg_c.add(np.full(1, float(d.guidance_scale)).repeat(n))
            # steps summary
            s = b.cols.get("steps")
            if s is not None and not pa.types.is_null(s.type):
                sv = _np(s, d.steps, np.float64)
                steps_c.add(sv[(sv >= 1) & (sv <= lim.max_steps)].astype(np.int64))
            else:
                steps_c.add(np.full(n, d.steps, np.int64))
            # scheduler
            sc = b.cols.get("scheduler")
            if sc is not None and not pa.types.is_null(sc.type):
                sc = _check_utf8(b, "scheduler", sc)
                known = pc.is_in(sc, value_set=pa.array(samplers))
                rule = f"scheduler must be one of {', '.join(samplers)}" + (f" (the {family.name} family's samplers)" if family else "")
                b.flag("scheduler", pc.and_(pc.is_valid(sc), pc.invert(known)), rule,
                       lambda value: _scheduler_fix(value, samplers), sc)
                vc = pc.value_counts(sc.fill_null(d.scheduler))
                for item in vc.to_pylist():
                    if item["values"] in samplers:
                        sched_c.counts[item["values"]] = sched_c.counts.get(item["values"], 0) + item["counts"]
            else:
                sched_c.counts[d.scheduler] = sched_c.counts.get(d.scheduler, 0) + n
            # init_image / strength
            init = b.cols.get("init_image")
            has_init = np.zeros(n, dtype=bool)
            if init is not None and not pa.types.is_null(init.type):
                has_init = pc.is_valid(init).to_numpy(zero_copy_only=False)
                init = _check_utf8(b, "init_image", init)
                b.flag("init_image", pc.equal(pc.utf8_length(init), 0), "init_image must be a non-empty path or s3:// URI",
                       "give the image path (relative to the manifest folder) or null for text-to-image")
                b.flag("init_image", pc.match_substring(init, "\x00"), "no NUL characters (\\x00) in init_image",
                       "fix the path")
            if "init_image" in skip:
                has_init = np.ones(n, dtype=bool)  # unknown: don't pile strength errors on a type error
            img2img += int(has_init.sum())
            st = b.cols.get("strength")
            if st is not None and not pa.types.is_null(st.type):
                sf = st.cast(pa.float64())
                given = pc.is_valid(sf).to_numpy(zero_copy_only=False)
                b.flag("strength", given & ~has_init, "strength is only for img2img rows: it needs init_image in the same row",
                       "set init_image for this row, or leave strength null", st)
            # img2img runs int(steps * strength) denoising steps; zero steps would make no image
            steps_v = np.full(n, float(d.steps)) if s is None or pa.types.is_null(s.type) else _np(s, d.steps, np.float64)
            strength_v = (np.full(n, float(d.strength)) if st is None or pa.types.is_null(st.type)
                          else _np(st.cast(pa.float64()), float(d.strength), np.float64))
            no_steps = has_init & (strength_v > 0) & (strength_v <= 1) & (steps_v >= 1) & (np.floor(steps_v * strength_v) < 1)
            b.flag("strength", no_steps, "img2img needs steps * strength >= 1 (it runs int(steps * strength) denoising steps)",
                   "raise strength or steps for this row", pa.array(strength_v))
            rs = b.cols.get("refiner_switch")
            if spec.model.refiner is None and rs is not None and not pa.types.is_null(rs.type):
                b.flag("refiner_switch", pc.is_valid(rs).to_numpy(zero_copy_only=False),
                       "refiner_switch is only for jobs with a refiner, and model.refiner is not set",
                       "set model.refiner (--refiner PATH) to an SDXL refiner folder, or leave refiner_switch null", rs)
            _check_loras(b, parr, spec.loras)
            if file_bad_all:
                b.bad[:] = True
            bad_rows += int(b.bad.sum())
            base += n
        if base - file_start != pf.metadata.num_rows:
            raise ManifestError(
                f"{path}: its Parquet footer says {pf.metadata.num_rows:,} rows but its data holds {base - file_start:,}; "
                "the file is corrupt or was cut short — write it again"
            )
    # --- duplicate ids -------------------------------------------------------------------------
    dup_count = 0
    if has_ids and manifest.num_rows:
        dup_count = _find_duplicate_ids(manifest, id_hashes, id_valid, coll, batch_size)
        bad_rows += dup_count
    del id_hashes, id_valid
    distinct, approx = prompts.estimate()
    summary: dict[str, Any] = {
        "source": manifest.source,
        "files": len(manifest.files),
        "fingerprint": manifest.fingerprint,
        "rows": manifest.num_rows,
        "distinct_prompts": distinct,
        "distinct_prompts_approximate": approx,
        "sizes": {f"{k >> 20}x{k & 0xFFFFF}": v for k, v in sizes.counts.items()},
        "steps": {int(k): v for k, v in steps_c.counts.items()},
        "guidance_scale": {float(k): v for k, v in cfg_c.counts.items()},
        "schedulers": dict(sched_c.counts),
        "img2img_rows": img2img,
        "seeds": "from the seed column" if "seed" in present
        else f"derived from job seed {spec.seed} and each row's id (derive_seed)",
        "ids": "from the id column" if has_ids else "row numbers (default_row_id: 00000000, 00000001, …)",
        "passthrough_columns": {c: str(manifest_type) for c, manifest_type in passthrough_types(manifest).items()},
        "bad_rows": min(bad_rows, manifest.num_rows),
    }
    return ValidationReport(num_rows=manifest.num_rows, issues=list(coll.kept), issue_count=coll.count, summary=summary,
                            warnings=warnings)


def passthrough_types(manifest: Manifest) -> dict[str, pa.DataType]:
    """The passthrough columns' Arrow types, as the index keeps them."""
    return {c: manifest.schema.field(c).type for c in manifest.passthrough_columns}


def _find_duplicate_ids(manifest: Manifest, hashes: np.ndarray, valid: np.ndarray, coll: _Collector, batch_size: int) -> int:
    """Count rows whose id an earlier row already used (8-byte hash per row, sorted), and
    report the first ones, confirmed by their actual strings (a second pass over ``id``).
    Peak: three arrays of 8 bytes per row (hashes, a sorted copy, the stable sort order)."""
    rows = None if valid.all() else np.flatnonzero(valid)
    hv = hashes if rows is None else hashes[rows]
    srt = np.sort(hv)
    dup_pos = np.flatnonzero(srt[1:] == srt[:-1]) + 1
    if len(dup_pos) == 0:
        return 0
    order = np.argsort(hv, kind="stable")  # equal hashes keep row order: the first is the original
    del hv
    first_pos = np.searchsorted(srt, srt[dup_pos], side="left")
    dup_rows, first_rows = order[dup_pos], order[first_pos]
    if rows is not None:
        dup_rows, first_rows = rows[dup_rows], rows[first_rows]
    del order, srt, rows
    count = len(dup_rows)
    # report the first ones, confirmed by their actual strings
    sel = np.argsort(dup_rows, kind="stable")[: coll.limit * 2]
    want_dup, want_first = dup_rows[sel], first_rows[sel]
    needed = np.unique(np.concatenate([want_dup, want_first]))
    id_of: dict[int, str] = {}
    base = 0
    for rb in iter_row_batches(manifest, columns=["id"], batch_size=batch_size):
        n = rb.num_rows
        lo, hi = np.searchsorted(needed, [base, base + n])
        if hi > lo:
            col = _decode(rb.column("id"))
            for r in needed[lo:hi].tolist():
                v = col[r - base].as_py()
                id_of[r] = str(v)
        base += n
        if base > needed[-1]:
            break
    reported = 0
    for r, f in zip(want_dup.tolist(), want_first.tolist()):
        if id_of.get(r) != id_of.get(f):
            count -= 1  # a 64-bit hash collision, not a duplicate
            continue
        if reported < coll.limit and not coll.full_before(r):
            coll.kept.append(RowIssue(r, id_of[r], "id", _repr_value(id_of[r]),
                                      f"ids must be unique (also used by row {f})",
                                      "give each row its own id, or drop the id column to use row numbers"))
            reported += 1
    coll.count += count
    coll._sort()
    return count
