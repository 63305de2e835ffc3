"""Storage layer: create-once object writes on a local directory or S3 (DESIGN §1, §4).

No torch, no ray. boto3 is imported lazily (only S3 paths need it).

Key rules
- Keys are relative, "/"-separated, never absolute, never containing "." / ".." segments.
- ``put_new`` is create-once: a key that already exists is never replaced; the stored
  object is read back and *adopted* (``PutResult(created=False, sha256=<of stored>)``).
  Callers compare ``sha256`` with their own bytes when they care whose bytes won.
  Note: ``created=False`` can also mean "our own earlier attempt wrote it but the
  response was lost" (S3: a PUT that succeeded server-side, then a connection reset,
  then botocore's retry answered 412).
- Errors: every failure is a ``StorageError`` with ``transient`` (retrying later may
  help: throttling, 5xx, connection resets/timeouts, an endpoint gone mid-job) or not.
  ``StorageConfigError`` = something the user must fix (missing bucket, access denied,
  no credentials, unreachable endpoint at preflight, bad URL). Messages name the
  bucket / endpoint / path, never credentials.

S3 client: one per process per (endpoint, max_attempts, max_pool_connections),
cached in ``_CLIENTS`` and reused by every thread (boto3 clients are thread-safe).
``register_client_hook(fn)`` lets code (tests/faults.py) attach botocore event
handlers to every cached client, present and future.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable
from urllib.parse import urlsplit

from sdbatch.errors import EXIT_BAD_INPUT, JobFailed

log = logging.getLogger("sdbatch.storage")

__all__ = [
    "StorageError",
    "StorageConfigError",
    "NotFound",
    "NotAnObject",
    "PutResult",
    "Storage",
    "LocalStorage",
    "S3Storage",
    "open_storage",
    "read_uri",
    "TooLarge",
    "fetch_model_dir",
    "object_identity",
    "register_client_hook",
    "clear_client_cache",
    "parse_s3_url",
    "check_uri",
    "s3_endpoint",
]

PROBE_PREFIX = "_sdbatch/"
TMP_MARK = ".sdbatch-tmp-"  # names temporary files; keys holding it are refused (and so are such row ids)
_COPY_CHUNK = 1 << 20
MODEL_MARKER = ".sdbatch-complete.json"


# ----------------------------------------------------------------------------------------------
# errors and results


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
    def exists(self, key: str) -> bool: ...
    def age(self, key: str) -> float: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def check_access(self) -> None: ...


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> str:
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


def _check_prefix(prefix: str) -> str:
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


def _redact_url(url: str | None) -> str | None:
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
            f"{what} {_redact_url(uri)!r} carries credentials (before its \"@\"; not shown); "
            "remove them from the URI and set them in the environment instead (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )
    return uri


# ----------------------------------------------------------------------------------------------
# local directory


class LocalStorage:
    """A directory. Create-once = write a temp file in the same dir, then ``os.link``."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        self.root = root.absolute()
        self.url = self.root.as_uri()
        self._real_root = self.root.resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        """The file of ``key``. A key whose resolved path leaves OUT (a symlinked folder or
        file pointing elsewhere) is refused, for reads, writes and deletes alike."""
        path = self.root.joinpath(*_check_key(key).split("/"))
        self._inside(path, key)
        return path

    def _inside(self, path: Path, key: str) -> None:
        real = path.resolve()
        if real != self._real_root and not real.is_relative_to(self._real_root):
            raise StorageConfigError(
                f"{self.url}/{key} resolves to {real}, outside the output directory {self._real_root} "
                "(a symbolic link): sdbatch never follows links out of OUT; remove the link or choose another --out"
            )

    def _write_temp(self, path: Path, data: bytes | Path) -> Path:
        """``data`` (bytes, or the local file at that path) in a temp file next to ``path``."""
        try:
            tmp = path.parent / f".{path.name}{TMP_MARK}{uuid.uuid4().hex}"
            try:
                with self._create(tmp) as f:
                    if isinstance(data, Path):
                        with open(data, "rb") as source:
                            shutil.copyfileobj(source, f, _COPY_CHUNK)
                    else:
                        f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            return tmp
        except PermissionError as e:
            raise StorageConfigError(
                f"cannot write under {self.root}: permission denied ({e.strerror}); "
                "choose a writable output directory"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}", transient=False) from e

    @staticmethod
    def _create(path: Path) -> BinaryIO:
        """``path`` opened for a new file, its folders made first — again if a ``delete``
        emptied and removed one meanwhile."""
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return open(path, "xb")
            except FileNotFoundError:
                if path.parent.is_dir():  # not that race
                    raise

    def put_new(self, key: str, data: bytes) -> PutResult:
        path = self._path(key)
        data = bytes(data)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            stored = self._read_existing(path, key)
            log.debug("put_new %s: key exists, adopting stored object (%d bytes)", key, len(stored))
            return PutResult(created=False, sha256=_sha256(stored), size=len(stored))
        except OSError as e:
            raise StorageError(
                f"cannot create {path}: {e} (create-once writes need a filesystem with hard links)"
            ) from e
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return PutResult(created=True, sha256=_sha256(data), size=len(data))

    def _read_existing(self, path: Path, key: str) -> bytes:
        """The object ``put_new`` found at ``key``; NotAnObject when what is there is no file."""
        try:
            return path.read_bytes()
        except (IsADirectoryError, FileNotFoundError, NotADirectoryError):
            what = "a symbolic link to nothing" if path.is_symlink() else "a directory" if path.is_dir() else "no file"
            raise NotAnObject(f"{self.url}/{key} is {what}, not an image sdbatch can create or adopt there") from None

    def put(self, key: str, data: bytes) -> None:
        self._replace(key, bytes(data))

    def put_file(self, key: str, source: Path) -> None:
        self._replace(key, Path(source))

    def _replace(self, key: str, data: bytes | Path) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write {path}: {e}") from e

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and a tag for ``replace_if``: its sha256."""
        data = self.get(key)
        return data, _sha256(data)

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Replace the object only if it still is the one ``tag`` names; its new tag, or None
        if it changed or is gone. Writers of a key serialise on an ``flock`` of a sidecar file."""
        path = self._path(key)
        if not path.parent.is_dir():
            return None
        with open(path.parent / f".{path.name}{TMP_MARK}cas-lock", "a+b") as guard:  # listings skip it
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                if _sha256(path.read_bytes()) != tag:
                    return None
            except FileNotFoundError:
                return None
            self._replace(key, bytes(data))
        return _sha256(data)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise NotFound(f"{self.url}/{key} not found") from e
        except PermissionError as e:
            raise StorageConfigError(f"cannot read {path}: permission denied") from e
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def age(self, key: str) -> float:
        """Seconds since ``key`` was last written, by the filesystem's clock (its mtime)."""
        try:
            return time.time() - self._path(key).stat().st_mtime
        except FileNotFoundError as e:
            raise NotFound(f"{self.url}/{key} not found") from e

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        # Walk only the deepest directory the prefix names.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.is_dir():
            return []
        self._inside(base, base_rel or ".")
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            # prune directories that cannot match
            dirnames[:] = [
                d for d in dirnames
                if (rel_dir + d + "/").startswith(prefix) or prefix.startswith(rel_dir + d + "/")
            ]
            for name in dirnames + filenames:  # a link out of OUT is refused, not skipped
                if os.path.islink(os.path.join(dirpath, name)):
                    self._inside(Path(dirpath) / name, rel_dir + name)
            for name in filenames:
                if TMP_MARK in name:
                    continue
                k = rel_dir + name
                if k.startswith(prefix):
                    out.append(k)
        out.sort()
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self.url}/{key}: {e}") from e
        # like S3, where a prefix exists only while it holds objects: no empty folder is left
        # behind (a refused run's lock leaves no `_sdbatch/`); a writer racing into a folder
        # removed here makes it again (``_write_temp``)
        for folder in path.parents:
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or not ours to remove): stop here
                break

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def check_access(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except PermissionError as e:
            raise StorageConfigError(
                f"cannot create output directory {self.root}: permission denied; "
                "choose a writable location"
            ) from e
        except (FileExistsError, NotADirectoryError) as e:
            raise StorageConfigError(f"output path {self.root} exists and is not a directory") from e
        except OSError as e:
            raise StorageConfigError(f"cannot create output directory {self.root}: {e}") from e
        if not self.root.is_dir():
            raise StorageConfigError(f"output path {self.root} exists and is not a directory")
        key = f"{PROBE_PREFIX}probe-{uuid.uuid4().hex}"
        probe_dir = self._path(key).parent
        probe_dir_existed = probe_dir.exists()
        try:
            self.put(key, b"probe")
            self.delete(key)
            if not probe_dir_existed:  # a refused job must leave a new OUT as it found it
                with contextlib.suppress(OSError):  # another driver's files appeared meanwhile
                    probe_dir.rmdir()
        except StorageConfigError:
            raise
        except StorageError as e:
            raise StorageConfigError(f"cannot write to output directory {self.root}: {e}") from e


# ----------------------------------------------------------------------------------------------
# S3 client cache and hooks

_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_HOOKS: list[Callable[[Any], None]] = []


def register_client_hook(fn: Callable[[Any], None]) -> Callable[[], None]:
    """Call ``fn(client)`` on every cached S3 client now and on every client created later.

    Returns a function that stops applying ``fn`` to future clients (handlers already
    registered on a client are the hook's own business to remove).
    """
    with _CLIENTS_LOCK:
        _HOOKS.append(fn)
        for client in _CLIENTS.values():
            fn(client)

    def unregister() -> None:
        with _CLIENTS_LOCK:
            if fn in _HOOKS:
                _HOOKS.remove(fn)

    return unregister


def clear_client_cache() -> None:
    """Forget cached clients (tests; or after changing credentials/env)."""
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def s3_endpoint(endpoint_url: str | None) -> str | None:
    """The S3 endpoint: ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
    (as boto3 reads them), else None (AWS)."""
    ep = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return check_uri(ep, "S3 endpoint (--s3-endpoint / AWS_ENDPOINT_URL)") if ep else None


def _get_client(endpoint_url: str | None = None, max_attempts: int = 5, max_pool_connections: int = 10):
    ep = s3_endpoint(endpoint_url)
    if ep is not None:
        try:
            parts = urlsplit(ep)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            raise StorageConfigError(
                f"invalid S3 endpoint URL {_redact_url(ep)!r}; pass --s3-endpoint http(s)://host:port"
            )
    key = (os.getpid(), ep, int(max_attempts), int(max_pool_connections))
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover
        raise StorageConfigError("s3:// locations need boto3: pip install boto3") from e
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            return client
        from botocore.exceptions import BotoCoreError

        try:
            session = boto3.session.Session()
            region = session.region_name or "us-east-1"
        except BotoCoreError as e:  # e.g. ProfileNotFound: names the profile, never a secret
            raise StorageConfigError(f"AWS configuration error: {e}; check AWS_PROFILE / ~/.aws/config") from None
        config = Config(
            # total_max_attempts = attempts INCLUDING the first request. (botocore's
            # retries={"max_attempts": N} counts retries only: N + 1 requests in all.)
            retries={"mode": "standard", "total_max_attempts": int(max_attempts)},
            max_pool_connections=int(max_pool_connections),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=10,  # a black-holed endpoint fails in tens of seconds, not minutes
        )
        try:
            client = session.client("s3", endpoint_url=ep, region_name=region, config=config)
        except (ValueError, BotoCoreError):  # the exception text may repeat the raw URL: not shown
            raise StorageConfigError(
                f"invalid S3 endpoint URL {_redact_url(ep)!r}; pass --s3-endpoint http(s)://host:port"
            ) from None
        for fn in _HOOKS:  # before publishing: no request runs without the hooks
            fn(client)
        _CLIENTS[key] = client
    log.debug("created S3 client endpoint=%s max_attempts=%d pool=%d", _redact_url(ep) or "<aws default>",
              max_attempts, max_pool_connections)
    return client


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → ("bucket", "some/prefix") (prefix may be "")."""
    if not url.startswith("s3://"):
        raise StorageConfigError(f"not an s3:// URL: {_redact_url(url)!r}")
    rest = check_uri(url, "S3 URL")[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageConfigError(f"S3 URL {url!r} names no bucket; expected s3://bucket/prefix")
    if "@" in bucket or ":" in bucket:
        raise StorageConfigError("S3 URL must be s3://bucket/prefix (no credentials or ports in the URL)")
    if not _BUCKET_RE.match(bucket):
        raise StorageConfigError(
            f"invalid S3 bucket name {bucket!r} in {url!r}: 3-63 characters, lowercase letters, digits, '.', '-'"
        )
    prefix = prefix.strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise StorageConfigError(f"invalid S3 prefix in {url!r}")
    return bucket, prefix


_CONFIG_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "InvalidSecurity",
    "403",
    "301",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "PriorRequestNotComplete",
    "ConditionalRequestConflict",
    "OperationAborted",
}


def _error_code(e: Exception) -> tuple[str, int]:
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _translate(e: Exception, *, what: str, bucket: str, endpoint: str | None, preflight: bool = False,
               target: str | None = None) -> StorageError:
    """Map a boto3/botocore exception to StorageError / StorageConfigError / NotFound."""
    from botocore import exceptions as bx

    where = f"bucket {bucket!r} at endpoint {_redact_url(endpoint) or 'AWS default (s3.amazonaws.com)'}"
    if isinstance(e, bx.ClientError):
        code, status = _error_code(e)
        if code == "NoSuchBucket" or (status == 404 and what.startswith("head_bucket")):
            return StorageConfigError(
                f"S3 {where} does not exist (during {what}); create it or fix the s3:// URL / --s3-endpoint"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"{target or 's3://' + bucket + '/' + what.split(' ', 1)[-1]} not found")
        if code in ("NotImplemented", "501") or status == 501:
            return StorageConfigError(
                f"S3 endpoint for {where} does not implement {what.split(' ', 1)[0]} as sdbatch uses it "
                f"({code or status}); sdbatch needs conditional writes (PutObject If-None-Match: *)"
            )
        if code in _CONFIG_CODES or status in (401, 403):
            return StorageConfigError(
                f"S3 access denied for {where} ({code or status} during {what}); check the credentials "
                "(AWS_PROFILE / AWS_ACCESS_KEY_ID / instance role) and the bucket policy"
            )
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return StorageError(
                f"S3 {code or status} on {what} ({where}) after retries", transient=True
            )
        return StorageError(f"S3 error {code or status} on {what} ({where})", transient=False)
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        return StorageConfigError(
            f"no usable AWS credentials for {where}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an instance role is available"
        )
    if isinstance(e, bx.NoRegionError):  # pragma: no cover - we always pass a region
        return StorageConfigError(f"no AWS region configured for {where}; set AWS_DEFAULT_REGION")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)) and preflight:
        return StorageConfigError(
            f"cannot reach S3 endpoint {_redact_url(endpoint) or 'AWS default'} for bucket {bucket!r} "
            f"({type(e).__name__}); check --s3-endpoint / AWS_ENDPOINT_URL and the network"
        )
    if isinstance(e, (bx.ConnectionError, bx.HTTPClientError, bx.ReadTimeoutError,
                      bx.ResponseStreamingError, bx.IncompleteReadError)):
        return StorageError(
            f"S3 connection failure on {what} ({where}): {type(e).__name__} after retries", transient=True
        )
    if isinstance(e, bx.ParamValidationError):
        return StorageError(f"invalid S3 request for {what}: {e}")
    if isinstance(e, bx.BotoCoreError):
        return StorageError(f"S3 failure on {what} ({where}): {type(e).__name__}", transient=True)
    return StorageError(f"S3 failure on {what} ({where}): {type(e).__name__}: {e}")


def _put_if_absent(client: Any, bucket: str, key: str, body: bytes) -> bool:
    """One ``put_object(IfNoneMatch="*")``: True if it created the key, False on 412."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except Exception as e:
        if not _is_botocore_error(e) or _error_code(e)[1] != 412:
            raise
        return False
    return True


def _if_match_refused(client: Any, bucket: str, key: str) -> bool:
    """Whether a ``put_object`` whose ``If-Match`` cannot match is refused (412), as the job
    lock's compare-and-swap needs; False when the store ignores the header or does not
    implement it."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"probe3", IfMatch='"' + "0" * 32 + '"')
    except Exception as e:
        if not _is_botocore_error(e):
            raise
        code, status = _error_code(e)
        if status == 412:
            return True
        if status == 501 or code == "NotImplemented":
            return False
        raise
    return False


def _is_botocore_error(e: Exception) -> bool:
    from botocore import exceptions as bx

    return isinstance(e, (bx.ClientError, bx.BotoCoreError))


# ----------------------------------------------------------------------------------------------
# S3


class S3Storage:
    """``s3://bucket/prefix`` via boto3. Create-once = ``PutObject(IfNoneMatch="*")``."""

    CONFLICT_RETRIES = 5

    def __init__(self, url: str, *, endpoint_url: str | None = None, max_attempts: int = 5,
                 max_pool_connections: int = 10):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._endpoint_raw = s3_endpoint(endpoint_url)
        self.endpoint_url = _redact_url(self._endpoint_raw)  # safe to print / record
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self):
        return _get_client(self._endpoint_raw, self.max_attempts, self.max_pool_connections)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _err(self, e: Exception, what: str, preflight: bool = False) -> StorageError:
        key = what.split(" ", 1)[1] if " " in what else ""
        return _translate(e, what=what, bucket=self.bucket, endpoint=self._endpoint_raw, preflight=preflight,
                          target=f"{self.url}/{key}" if key else self.url)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as e:
            if _is_botocore_error(e):
                raise self._err(e, what) from None
            raise

    def put_new(self, key: str, data: bytes) -> PutResult:
        full = self._key(key)
        data = bytes(data)
        client = self.client
        for attempt in range(1, self.CONFLICT_RETRIES + 1):
            try:
                client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return PutResult(created=True, sha256=_sha256(data), size=len(data))
            except Exception as e:
                if not _is_botocore_error(e):
                    raise
                code, status = _error_code(e)
                if status == 412 or code == "PreconditionFailed":
                    try:
                        stored = self.get(key)
                    except NotFound:
                        # deleted between our PUT and GET: try to create again
                        continue
                    log.debug("put_new %s: key exists, adopting stored object (%d bytes)", self.url + "/" + key,
                             len(stored))
                    return PutResult(created=False, sha256=_sha256(stored), size=len(stored))
                if status == 409 or code == "ConditionalRequestConflict":
                    delay = min(0.05 * 2 ** attempt, 2.0)
                    log.info("put_new %s: 409 %s, retry %d in %.2fs", self.url + "/" + key, code, attempt, delay)
                    time.sleep(delay)
                    continue
                raise self._err(e, f"put_object {key}") from None
        raise StorageError(f"put_new {self.url}/{key}: conflicting concurrent writes, gave up after "
                           f"{self.CONFLICT_RETRIES} attempts", transient=True)

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put_object {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                   Body=bytes(data))

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and a tag for ``replace_if``: its ETag."""
        resp = self._call(f"get_object {key}", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read(), resp["ETag"]

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """``PutObject`` with ``If-Match: tag``: the new ETag, or None if the object changed or
        is gone (412/404). A 412 answering a retried request whose first try had succeeded is
        told apart by reading the object back: ``data`` identifies its writer."""
        data = bytes(data)
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=tag)
            return resp["ETag"]
        except Exception as e:
            if not _is_botocore_error(e):
                raise
            code, status = _error_code(e)
            if status not in (404, 412) and code not in ("PreconditionFailed", "NoSuchKey"):
                raise self._err(e, f"put_object(If-Match) {key}") from None
        try:
            stored, stored_tag = self.get_tagged(key)
        except NotFound:
            return None
        return stored_tag if stored == data else None

    def put_file(self, key: str, source: Path) -> None:
        """Upload a local file (multipart when large, so it is never read into memory whole)."""
        from boto3.exceptions import S3UploadFailedError

        try:
            self._call(f"upload_file {key}", self.client.upload_file, str(source), self.bucket, self._key(key))
        except S3UploadFailedError as e:  # s3transfer wraps the ClientError in a message
            raise StorageError(f"upload of {self.url}/{key} failed: {e}", transient=True) from None

    def get(self, key: str) -> bytes:
        full = self._key(key)
        for attempt in range(3):
            resp = self._call(f"get_object {key}", self.client.get_object, Bucket=self.bucket, Key=full)
            try:
                return resp["Body"].read()
            except Exception as e:  # body stream broke mid-read: botocore does not retry that
                if not _is_botocore_error(e) or attempt == 2:
                    if _is_botocore_error(e):
                        raise self._err(e, f"get_object {key}") from None
                    raise
                log.info("get %s: stream error %s, retrying", key, type(e).__name__)
        raise AssertionError("unreachable")

    def exists(self, key: str) -> bool:
        try:
            self._call(f"head_object {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.objects(prefix))

    def objects(self, prefix: str = "") -> dict[str, tuple[int, str]]:
        """Every object under ``prefix`` (directory placeholders left out): its key relative
        to this storage, its size and its ETag."""
        root = f"{self.prefix}/" if self.prefix else ""
        prefix = _check_prefix(prefix)

        def listing() -> list[dict[str, Any]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            return [obj for page in pages for obj in page.get("Contents", ())]

        return {obj["Key"][len(root):]: (int(obj["Size"]), obj["ETag"])
                for obj in self._call(f"list_objects_v2 {prefix}", listing)
                if obj["Key"][len(root):] and not obj["Key"].endswith("/")}

    def age(self, key: str) -> float:
        """Seconds since ``key`` was last written, by the server's clock (its ``Date`` header
        minus the object's ``Last-Modified``), so no host's clock is trusted."""
        from email.utils import parsedate_to_datetime

        resp = self._call(f"head_object {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        server_now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (server_now - resp["LastModified"]).total_seconds()

    def delete(self, key: str) -> None:
        self._call(f"delete_object {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: list[str]) -> None:
        """``DeleteObjects``, 1,000 keys a request (the API's limit)."""
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            resp = self._call(f"delete_objects ({len(chunk)} keys)", self.client.delete_objects,
                              Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"S3 could not delete {len(resp['Errors'])} objects under {self.url}, e.g. "
                                   f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                                   transient=first.get("Code") in _TRANSIENT_CODES)

    def check_access(self) -> None:
        # Preflight uses at most 3 attempts so an unreachable endpoint fails in seconds.
        # Checks, in order: the bucket exists and we may use it; we can create an object with
        # If-None-Match: * and the store HONOURS it (a second create answers 412 — some
        # S3-compatible stores ignore the header, which would silently break create-once);
        # we can read it back and list; we can delete it.
        client = _get_client(self._endpoint_raw, min(self.max_attempts, 3), self.max_pool_connections)
        probe = self._key(f"{PROBE_PREFIX}probe-{uuid.uuid4().hex}")
        step = "head_bucket"
        try:
            client.head_bucket(Bucket=self.bucket)
            step = "put_object(If-None-Match) probe"
            # False here means a retry after a lost response found our own probe
            _put_if_absent(client, self.bucket, probe, b"probe")
            honoured = not _put_if_absent(client, self.bucket, probe, b"probe2")
            step = "put_object(If-Match) probe"
            swap_honoured = _if_match_refused(client, self.bucket, probe)
            step = "get_object probe"
            client.get_object(Bucket=self.bucket, Key=probe)["Body"].read()
            step = "list_objects_v2"
            client.list_objects_v2(Bucket=self.bucket, Prefix=probe, MaxKeys=1)
            step = "delete_object probe"
            client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as e:
            if not _is_botocore_error(e):
                raise
            err = _translate(e, what=f"{step} under {self.url}/{PROBE_PREFIX}", bucket=self.bucket,
                             endpoint=self._endpoint_raw, preflight=True)
            if not isinstance(err, StorageConfigError):
                err = StorageConfigError(f"S3 preflight failed: {err}", transient=err.transient)
            raise err from None
        if not swap_honoured:
            log.warning(
                "S3 endpoint %s (bucket %r) does not honour If-Match on PutObject: the job lock falls back to "
                "last-writer-wins (two drivers racing for an expired lock could both run; create-once writes "
                "still keep every row exactly once)", _redact_url(self.endpoint_url) or "AWS default", self.bucket,
            )
        if not honoured:
            raise StorageConfigError(
                f"S3 endpoint {self.endpoint_url or 'AWS default'} (bucket {self.bucket!r}) ignores "
                "If-None-Match: * on PutObject, so create-once writes cannot be guaranteed; use an "
                "S3-compatible store that supports conditional writes (If-None-Match)"
            )


# ----------------------------------------------------------------------------------------------
# helpers


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def open_storage(url: str, *, endpoint_url: str | None = None, max_attempts: int = 5,
                 max_pool_connections: int = 10) -> Storage:
    """"s3://bucket/prefix" → S3Storage; "file:///dir" or a path → LocalStorage (created on first write)."""
    url = check_uri(str(url), "location")
    m = _SCHEME_RE.match(url)
    if m:
        scheme = m.group(1).lower()
        if scheme == "s3":
            return S3Storage(url, endpoint_url=endpoint_url, max_attempts=max_attempts,
                             max_pool_connections=max_pool_connections)
        if scheme == "file":
            return LocalStorage(_file_url_path(url))
        raise StorageConfigError(
            f"unsupported storage URL scheme {scheme!r} in {_redact_url(url)!r}: use s3://bucket/prefix or a local path"
        )
    return LocalStorage(url)


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StorageConfigError(f"file:// URL with a host is not supported: {url!r}")
    from urllib.parse import unquote

    return unquote(parts.path)


class TooLarge(StorageError):
    """An object larger than the caller's ``max_bytes`` (not read past it)."""


def read_uri(uri: str | Path, *, endpoint_url: str | None = None, max_bytes: int | None = None) -> bytes:
    """Bytes of a local path, file:// URL, or s3://bucket/key. Raises NotFound / StorageError,
    and TooLarge for an object over ``max_bytes`` (of which at most ``max_bytes + 1`` are read).
    A local path must be a regular file: a FIFO or device is refused, never opened."""
    uri = check_uri(str(uri), "location")
    if uri.startswith("s3://"):
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
    m = _SCHEME_RE.match(uri)
    if m:
        if m.group(1).lower() != "file":
            raise StorageConfigError(f"unsupported URL scheme in {_redact_url(uri)!r}: use a local path or s3://")
        uri = _file_url_path(uri)
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


def default_model_cache_dir() -> Path:
    env = os.environ.get("SDBATCH_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sdbatch" / "models"


def _cache_dir(root: Path, pin: str) -> Path:
    return root / hashlib.sha256(pin.encode()).hexdigest()[:16]


def fetch_model_dir(uri: str, *, pin: str | None = None, cache_dir: str | Path | None = None,
                    endpoint_url: str | None = None) -> tuple[Path, str]:
    """A local copy of the ``s3://bucket/prefix`` model and its pin (``models.s3_pin``: the
    objects' names, sizes and ETags).

    The per-node cache (``cache_dir``, default ``~/.cache/sdbatch/models`` or
    ``$SDBATCH_MODEL_CACHE``) is keyed by the pin, so replaced weights are never served from an
    old copy: with ``pin`` given and a complete copy of it cached, no S3 request is made;
    otherwise the prefix is listed and its current objects are downloaded, each ``GetObject``
    conditional on the listed ETag (an object replaced mid-download fails it). Concurrent
    processes download once (a file lock); the marker ``.sdbatch-complete.json`` is written last.
    Policy (pickles, family) is not checked here: ``sdbatch.models`` does that."""
    from filelock import FileLock

    from sdbatch.models import s3_pin

    bucket, prefix = parse_s3_url(uri)
    canonical = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    ep = s3_endpoint(endpoint_url)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_model_cache_dir()
    if pin is not None and _complete(_cache_dir(root, pin)):
        return _cache_dir(root, pin), pin
    storage = S3Storage(canonical, endpoint_url=ep)
    listing = storage.objects("")
    if not listing:
        raise NotFound(f"no model files under {canonical}")
    for rel in listing:
        _check_key(rel)
    found = s3_pin(listing)
    dest = _cache_dir(root, found)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _complete(dest):
            return dest, found
        dest.mkdir(parents=True, exist_ok=True)
        total = 0
        root_prefix = f"{prefix}/" if prefix else ""
        for rel, (size, etag) in sorted(listing.items()):
            target = dest.joinpath(*rel.split("/"))
            if target.is_file() and target.stat().st_size == size:
                continue  # finished in an interrupted earlier download (each file is temp+rename)
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(storage.client, bucket, root_prefix + rel, target, size, etag, ep)
            total += size
        marker = {"uri": canonical, "pin": found, "files": {rel: size for rel, (size, _) in listing.items()},
                  "completed_at": time.time()}
        tmp = dest / (MODEL_MARKER + TMP_MARK)
        tmp.write_text(json.dumps(marker, sort_keys=True))
        os.replace(tmp, dest / MODEL_MARKER)
        log.info("downloaded model %s (%d files, %d bytes) to %s", canonical, len(listing), total, dest)
    return dest, found


def _complete(dest: Path) -> bool:
    marker = dest / MODEL_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, size in files.items():
        try:
            if dest.joinpath(*rel.split("/")).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _download(client, bucket: str, key: str, target: Path, size: int, etag: str, ep: str | None,
              tries: int = 3) -> None:
    tmp = target.with_name(target.name + TMP_MARK + uuid.uuid4().hex)
    last: Exception | None = None
    try:
        for attempt in range(tries):
            try:
                body = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
                with open(tmp, "wb") as f:
                    for chunk in body.iter_chunks(8 << 20):
                        f.write(chunk)
                got = tmp.stat().st_size
                if got != size:
                    raise StorageError(f"s3://{bucket}/{key}: downloaded {got} bytes, listing says {size}",
                                       transient=True)
                os.replace(tmp, target)
                return
            except StorageError as e:
                last = e
            except Exception as e:
                if not _is_botocore_error(e):
                    raise
                if _error_code(e)[1] == 412:
                    raise StorageError(f"s3://{bucket}/{key} was replaced while the model was downloading; "
                                       "run again once the model is no longer being changed") from None
                err = _translate(e, what=f"get_object {key}", bucket=bucket, endpoint=ep)
                if not err.transient:
                    raise err from None
                last = err
            log.info("download %s failed (%s), attempt %d/%d", key, last, attempt + 1, tries)
        assert last is not None
        raise last
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
