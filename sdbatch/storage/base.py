"""The storage interface and its errors: create-once writes, compare-and-swap, listing, and the
checks every key, prefix and URI passes (design.md §5.2, §5.6)."""

from __future__ import annotations

import builtins
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from sdbatch.errors import EXIT_BAD_INPUT, JobFailed

PROBE_PREFIX = "_sdbatch/"


TMP_MARK = ".sdbatch-tmp-"  # names temporary files; keys holding it are refused (and so are such row ids)


COPY_CHUNK = 1 << 20


class StorageError(JobFailed):
    """Any storage failure (exit 5 when it stops a driver). ``transient``: retrying later may succeed."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class StorageConfigError(StorageError):
    """A problem the user must fix (bucket, access, credentials, endpoint, URL): exit 2."""

    exit_code = EXIT_BAD_INPUT


class NotFound(StorageError):
    def __init__(self, message: str):
        super().__init__(message, transient=False)


class NotAnObject(StorageError):
    """``put_new`` at a key a directory or a link to nothing holds (local storage): there is no
    object to create there nor to adopt. Not transient: it stays until someone removes it."""


@dataclass(frozen=True)
class PutResult:
    created: bool  # False = the key already existed and we adopted the stored object
    sha256: str  # of the object now stored under the key
    size: int


@runtime_checkable
class Storage(Protocol):
    url: str

    def put_new(self, key: str, data: bytes) -> PutResult: ...
    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, source: Path) -> None: ...
    def get_tagged(self, key: str) -> tuple[bytes, str]: ...
    def replace_if(self, key: str, data: bytes, tag: str) -> str | None: ...
    def get(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...  # seekable; read a slice at a time (a Parquet footer, a row group)
    def exists(self, key: str) -> bool: ...
    def age(self, key: str) -> float: ...
    def list(self, prefix: str) -> list[str]: ...
    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]: ...  # every object under prefix and its size, in key order
    def list_folder(self, prefix: str) -> Iterator[str]: ...  # what sits directly under a folder: keys, and sub-folders ending in "/"
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: builtins.list[str]) -> None: ...  # the method ``list`` shadows the type
    def check_access(self) -> None: ...


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid storage key {key!r}: must be relative, '/'-separated")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    if TMP_MARK in key:
        raise StorageError(f"invalid storage key {key!r}: reserved marker {TMP_MARK!r}")
    return key


def check_prefix(prefix: str) -> str:
    if prefix in ("", None):
        return ""
    if prefix.startswith("/") or "\\" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise StorageError(f"invalid list prefix {prefix!r}")
    return prefix


def _userinfo_end(url: str) -> int:
    """Where the user-info (``user:secret@``) of ``url`` ends — the index after its ``@`` — or 0
    when it has none. A secret may hold ``/`` (AWS's do), so an authority whose "port" is not a
    number, with an ``@`` after it, is user-info too."""
    scheme, sep, rest = url.partition("://")
    at = rest.find("@")
    if not sep or at < 0:
        return 0
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    _, colon, port = authority.partition(":")
    if "@" in authority or (colon and not port.isdigit()):
        return len(scheme) + len(sep) + at + 1
    return 0


def redact_url(url: str | None) -> str | None:
    """``url`` without its user-info: what any message, log or record may show of a URI."""
    if not url:
        return url
    end = _userinfo_end(url)
    return url[: url.index("://") + 3] + url[end:] if end else url


def check_uri(uri: str, what: str) -> str:
    """``uri``, unless it carries user-info: then a ``StorageConfigError`` naming it redacted.
    Credentials belong in the environment, never in a URI, which reaches messages, logs and
    job records. Every URI sdbatch is given passes here when it is parsed (``parse_s3_url``,
    ``open_storage``, ``read_uri``, the S3 endpoint, the manifest)."""
    if _userinfo_end(uri):
        raise StorageConfigError(
            f"{what} {redact_url(uri)!r} carries credentials (before its \"@\"; not shown); "
            "remove them from the URI and set them in the environment instead (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    return uri


class TooLarge(StorageError):
    """An object larger than the caller's ``max_bytes`` (not read past it)."""
