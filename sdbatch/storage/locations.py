"""The one place that reads a location string's scheme: whether it is remote, an S3 URI, a
``file://`` URL or a plain path. Every "is this remote?" question in sdbatch asks here; the
stores and the opening of a location (``storage.open``) act on the answer. Pure: it imports
nothing of storage, so every module of it may import this one."""

from __future__ import annotations

import re

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"

#: ``scheme://`` at the start of a URL (RFC 3986 scheme characters).
SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def url_scheme(location: str) -> str | None:
    """The scheme of ``location`` in lower case (``"s3"``, ``"file"``, …), or None for a path."""
    m = SCHEME_RE.match(location)
    return m.group(1).lower() if m else None


def has_scheme(location: str) -> bool:
    """Whether ``location`` is written as a URL at all (``file://`` included)."""
    return "://" in location


def is_remote(location: str) -> bool:
    """Whether ``location`` names something outside this machine's file system: a URL other
    than ``file://`` (S3, or a scheme the caller then refuses)."""
    return has_scheme(location) and not location.startswith(FILE_SCHEME)


def is_s3(location: str) -> bool:
    return location.startswith(S3_SCHEME)


def local_path(location: str) -> str:
    """A ``file://`` URL's path; any other location unchanged."""
    return location[len(FILE_SCHEME):] if location.startswith(FILE_SCHEME) else location


def s3_path(uri: str) -> str:
    """``s3://bucket/key`` → ``bucket/key`` (the form pyarrow's S3 file system takes)."""
    return uri[len(S3_SCHEME):]


def s3_bucket(uri: str) -> str:
    """``s3://bucket/key`` → ``bucket``."""
    return s3_path(uri).partition("/")[0]
