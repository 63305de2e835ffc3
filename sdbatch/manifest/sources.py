"""Manifest reading and validation, and the ``Row`` value type.

A ``Row`` is one manifest row with every job default already applied. It flows from the
manifest reader through planning and batching to the generator and into the metadata
record, so it holds only plain, serialisable values.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch.data.columns import KNOWN_COLUMNS
from sdbatch.data.index import JOB_KEY
from sdbatch.errors import BadInput
from sdbatch.storage.base import check_uri
from sdbatch.storage.locations import is_remote, is_s3, local_path, s3_path
from sdbatch.storage.s3_client import s3_endpoint

#: Columns pandas writes for a non-default index; they are neither checked nor passed through.
IGNORED_PREFIX = "__index_level_"


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
    ``file_pins`` each file's pin (``pin_file``), which every reader checks when it opens it.
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
        return tuple(c for c in self.columns if c not in KNOWN_COLUMNS and not c.startswith(IGNORED_PREFIX))


def _remote_fs(uri: str, endpoint_url: str | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem for a URI. For ``s3://`` the endpoint is ``endpoint_url``, else
    ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (as boto3 reads them), so an
    S3-compatible store (MinIO, moto) works on the driver and on every worker alike."""
    import pyarrow.fs as pafs

    endpoint = s3_endpoint(endpoint_url)
    try:
        if is_s3(uri) and endpoint:
            from urllib.parse import urlparse

            ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            fs = pafs.S3FileSystem(
                endpoint_override=ep.netloc,
                scheme=ep.scheme or "https",
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            )
            return fs, s3_path(uri)
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - any filesystem error is a bad source
        raise ManifestError(f"cannot open manifest location {uri}: {exc}") from None


def _open_input(path: str, endpoint_url: str | None = None) -> pa.NativeFile:
    """A readable file for a local path or a URI."""
    if is_remote(path):
        fs, p = _remote_fs(path, endpoint_url)
        return fs.open_input_file(p)
    return pa.OSFile(path)


def parquet_file(path: str, streaming: bool = False, endpoint_url: str | None = None) -> pq.ParquetFile:
    return open_parquet(path, streaming, endpoint_url)[0]


def open_parquet(path: str, streaming: bool = False,
                  endpoint_url: str | None = None) -> tuple[pq.ParquetFile, pa.NativeFile]:
    """``path`` as a ParquetFile, and the file handle it reads (what ``pin_file`` hashes)."""
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
        if is_remote(path):
            fs, p = _remote_fs(path)
            return fs.get_file_info(p).size
        return os.path.getsize(path)
    except Exception:  # noqa: BLE001
        return None


def _hidden(rel: str) -> bool:
    """Paths Spark/Hadoop/pandas leave beside data files (``_SUCCESS``, ``.crc``, ``_temporary/``)."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _list_local(source: str) -> tuple[list[str], str]:
    source = local_path(source)
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


def s3_identity(uri: str, endpoint_url: str | None = None) -> str:
    """An s3:// file's ETag and version id: a content change of any kind changes the ETag."""
    from sdbatch.storage.base import StorageError
    from sdbatch.storage.open import object_identity

    try:
        return object_identity(uri, endpoint_url=endpoint_url)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest file {uri}: {exc}") from None


def pin_file(path: str, pf: pq.ParquetFile, fingerprint: Any, handle: pa.NativeFile,
              endpoint_url: str | None = None) -> str:
    """One manifest file's pin, also fed into ``fingerprint`` (the manifest's hash): for an
    ``s3://`` file its ETag and version id, for another remote file the sha256 of its size and
    complete footer, for a local file the sha256 of its bytes, read through ``handle`` — the
    one its rows are then read from, so a file replaced after the check is never read."""
    if is_s3(path):
        identity = s3_identity(path, endpoint_url)
        fingerprint.update(f"s3:{identity}\0".encode())
        return f"s3:{identity}"
    if is_remote(path):
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

    The fingerprint is a SHA-256 over every file's pin (``pin_file``: its bytes, streamed
    at ~1.5 GB/s; an ``s3://`` object's ETag and version id — any content change changes the
    ETag; another remote file's size and complete Parquet footer) and, for several files, their
    relative names. Each file's own pin is kept (``Manifest.file_pins``) for the readers.
    """
    source = check_uri(str(source), "manifest")
    if is_remote(source):
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
        pf, handle = open_parquet(path)
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
        file_pins.append(pin_file(path, pf, h, handle))
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
