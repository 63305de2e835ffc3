"""An S3 prefix as a ``Storage``: create-once by ``If-None-Match``, compare-and-swap by ``If-Match``."""

from __future__ import annotations

import builtins
import io
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sdbatch.storage.base import (
    PROBE_PREFIX,
    NotFound,
    PutResult,
    StorageConfigError,
    StorageError,
    check_key,
    check_prefix,
    redact_url,
    sha256_of,
)
from sdbatch.storage.s3_client import (
    _TRANSIENT_CODES,
    _error_code,
    _get_client,
    _if_match_refused,
    _is_botocore_error,
    _put_if_absent,
    _translate,
    parse_s3_url,
    s3_endpoint,
)

log = logging.getLogger("sdbatch.storage")


READ_BUFFER = 4 << 20  # bytes one ranged GET of ``open_read`` asks for at least


class _RangedObject(io.RawIOBase):
    """One S3 object as a seekable raw file; each read is a GET of its byte range, pinned to the
    ETag seen when it was opened (``If-Match``) so a reader never mixes two versions."""

    def __init__(self, storage: S3Storage, key: str, size: int, etag: str):
        self._storage, self._key, self._size, self._etag, self._at = storage, key, size, etag, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer: Any) -> int:
        end = min(self._size, self._at + len(buffer))
        if end <= self._at:
            return 0
        storage = self._storage
        resp = storage._call(f"get_object {self._key}", storage.client.get_object, Bucket=storage.bucket,
                             Key=storage._key(self._key), Range=f"bytes={self._at}-{end - 1}", IfMatch=self._etag)
        data = resp["Body"].read()
        buffer[:len(data)] = data
        self._at += len(data)
        return len(data)


class S3Storage:
    """``s3://bucket/prefix`` via boto3. Create-once = ``PutObject(IfNoneMatch="*")``."""

    CONFLICT_RETRIES = 5

    def __init__(self, url: str, *, endpoint_url: str | None = None, max_attempts: int = 5,
                 max_pool_connections: int = 10):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._endpoint_raw = s3_endpoint(endpoint_url)
        self.endpoint_url = redact_url(self._endpoint_raw)  # safe to print / record
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self):
        return _get_client(self._endpoint_raw, self.max_attempts, self.max_pool_connections)

    def _key(self, key: str) -> str:
        check_key(key)
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
                return PutResult(created=True, sha256=sha256_of(data), size=len(data))
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
                    return PutResult(created=False, sha256=sha256_of(stored), size=len(stored))
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

    def open_read(self, key: str) -> BinaryIO:
        """The object as a seekable file read by ranged GETs (``READ_BUFFER`` bytes at a time), so
        a reader of one slice (a Parquet footer and row group) never downloads the whole."""
        head = self._call(f"head_object {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        return io.BufferedReader(_RangedObject(self, key, int(head["ContentLength"]), head["ETag"]), READ_BUFFER)

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
        prefix = check_prefix(prefix)

        def listing() -> list[dict[str, Any]]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            return [obj for page in pages for obj in page.get("Contents", ())]

        return {obj["Key"][len(root):]: (int(obj["Size"]), obj["ETag"])
                for obj in self._call(f"list_objects_v2 {prefix}", listing)
                if obj["Key"][len(root):] and not obj["Key"].endswith("/")}

    def _pages(self, prefix: str, **options: Any) -> Iterator[dict[str, Any]]:
        """``list_objects_v2`` under ``prefix``, a page (1,000 keys) at a time, each page retried
        on its own."""
        root = f"{self.prefix}/" if self.prefix else ""
        prefix = check_prefix(prefix)
        request = {"Bucket": self.bucket, "Prefix": root + prefix, **options}
        while True:
            page = self._call(f"list_objects_v2 {prefix}", self.client.list_objects_v2, **request)
            yield page
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        start = len(f"{self.prefix}/" if self.prefix else "")
        for page in self._pages(prefix):
            for obj in page.get("Contents", ()):
                key = obj["Key"][start:]
                if key and not key.endswith("/"):
                    yield key, int(obj["Size"])

    def list_folder(self, prefix: str = "") -> Iterator[str]:
        """The keys directly under the folder ``prefix`` ("" or ending in "/") and its
        sub-folders (``prefix/name/``), in key order (a delimiter listing)."""
        start = len(f"{self.prefix}/" if self.prefix else "")
        for page in self._pages(prefix, Delimiter="/"):
            keys = [obj["Key"][start:] for obj in page.get("Contents", ())]
            folders = [common["Prefix"][start:] for common in page.get("CommonPrefixes", ())]
            yield from sorted(k for k in keys + folders if k and k != prefix)

    def age(self, key: str) -> float:
        """Seconds since ``key`` was last written, by the server's clock (its ``Date`` header
        minus the object's ``Last-Modified``), so no host's clock is trusted."""
        from email.utils import parsedate_to_datetime

        resp = self._call(f"head_object {key}", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        server_now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
        return (server_now - resp["LastModified"]).total_seconds()

    def delete(self, key: str) -> None:
        self._call(f"delete_object {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: builtins.list[str]) -> None:  # the method ``list`` shadows the type
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
                "still keep every row exactly once)", redact_url(self.endpoint_url) or "AWS default", self.bucket,
            )
        if not honoured:
            raise StorageConfigError(
                f"S3 endpoint {self.endpoint_url or 'AWS default'} (bucket {self.bucket!r}) ignores "
                "If-None-Match: * on PutObject, so create-once writes cannot be guaranteed; use an "
                "S3-compatible store that supports conditional writes (If-None-Match)"
            )
