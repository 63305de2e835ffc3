"""Opening a location string: a storage for a prefix, the bytes of one object, an object's identity."""

from __future__ import annotations

import stat
from pathlib import Path

from sdbatch.storage.base import NotFound, Storage, StorageConfigError, StorageError, TooLarge, check_uri, redact_url
from sdbatch.storage.local import LocalStorage, file_url_path
from sdbatch.storage.locations import is_s3, url_scheme
from sdbatch.storage.s3 import S3Storage
from sdbatch.storage.s3_client import (
    _error_code,
    _get_client,
    _is_botocore_error,
    _translate,
    parse_s3_url,
    s3_endpoint,
)


def open_storage(url: str, *, endpoint_url: str | None = None, max_attempts: int = 5,
                 max_pool_connections: int = 10) -> Storage:
    """"s3://bucket/prefix" → S3Storage; "file:///dir" or a path → LocalStorage (created on first write)."""
    url = check_uri(str(url), "location")
    scheme = url_scheme(url)
    if scheme:
        if scheme == "s3":
            return S3Storage(url, endpoint_url=endpoint_url, max_attempts=max_attempts,
                             max_pool_connections=max_pool_connections)
        if scheme == "file":
            return LocalStorage(file_url_path(url))
        raise StorageConfigError(
            f"unsupported storage URL scheme {scheme!r} in {redact_url(url)!r}: use s3://bucket/prefix or a local path"
        )
    return LocalStorage(url)


def read_uri(uri: str | Path, *, endpoint_url: str | None = None, max_bytes: int | None = None) -> bytes:
    """Bytes of a local path, file:// URL, or s3://bucket/key. Raises NotFound / StorageError,
    and TooLarge for an object over ``max_bytes`` (of which at most ``max_bytes + 1`` are read).
    A local path must be a regular file: a FIFO or device is refused, never opened."""
    uri = check_uri(str(uri), "location")
    if is_s3(uri):
        bucket, key = parse_s3_url(uri)
        if not key:
            raise StorageConfigError(f"{uri!r} names a bucket, not an object")
        ep = s3_endpoint(endpoint_url)
        client = _get_client(ep)
        try:
            ranged = {"Range": f"bytes=0-{max_bytes}"} if max_bytes is not None else {}
            data = client.get_object(Bucket=bucket, Key=key, **ranged)["Body"].read()
            if max_bytes is not None and len(data) > max_bytes:
                raise TooLarge(f"{uri} is larger than {max_bytes:,} bytes")
            return data
        except Exception as e:
            if not _is_botocore_error(e):
                raise
            if ranged and _error_code(e)[1] == 416:  # a range of an empty object
                return b""
            err = _translate(e, what=f"get_object {key}", bucket=bucket, endpoint=ep)
            if isinstance(err, NotFound):
                err = NotFound(f"{uri} not found")
            raise err from None
    scheme = url_scheme(uri)
    if scheme:
        if scheme != "file":
            raise StorageConfigError(f"unsupported URL scheme in {redact_url(uri)!r}: use a local path or s3://")
        uri = file_url_path(uri)
    p = Path(uri).expanduser()
    try:
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(p)
        if not stat.S_ISREG(mode):  # opening a FIFO blocks; a device may never end
            raise StorageError(f"{p} is not a regular file ({_file_kind(mode)})")
        with p.open("rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"{p} is larger than {max_bytes:,} bytes ({p.stat().st_size:,})")
        return data
    except (FileNotFoundError, NotADirectoryError) as e:
        raise NotFound(f"{p} not found") from e
    except IsADirectoryError as e:
        raise StorageError(f"{p} is a directory, not a file") from e
    except PermissionError as e:
        raise StorageConfigError(f"cannot read {p}: permission denied") from e


def object_identity(uri: str, *, endpoint_url: str | None = None) -> str:
    """``ETag`` (and ``VersionId`` where versioning is on) of the object at ``s3://bucket/key``."""
    bucket, key = parse_s3_url(uri)
    if not key:
        raise StorageConfigError(f"{uri!r} names a bucket, not an object")
    ep = s3_endpoint(endpoint_url)
    try:
        resp = _get_client(ep).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        if not _is_botocore_error(e):
            raise
        raise _translate(e, what=f"head_object {key}", bucket=bucket, endpoint=ep, target=uri) from None
    return f"{resp['ETag']}|{resp.get('VersionId') or ''}"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"
