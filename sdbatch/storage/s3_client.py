"""One cached botocore client per process and endpoint, and the translation of S3 errors into
storage errors (transient, misconfigured, not found)."""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Callable
from urllib.parse import urlsplit

from sdbatch.storage.base import NotFound, StorageConfigError, StorageError, check_uri, redact_url
from sdbatch.storage.locations import is_s3

log = logging.getLogger("sdbatch.storage")


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
                f"invalid S3 endpoint URL {redact_url(ep)!r}; pass --s3-endpoint http(s)://host:port"
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
                f"invalid S3 endpoint URL {redact_url(ep)!r}; pass --s3-endpoint http(s)://host:port"
            ) from None
        for fn in _HOOKS:  # before publishing: no request runs without the hooks
            fn(client)
        _CLIENTS[key] = client
    log.debug("created S3 client endpoint=%s max_attempts=%d pool=%d", redact_url(ep) or "<aws default>",
              max_attempts, max_pool_connections)
    return client


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → ("bucket", "some/prefix") (prefix may be "")."""
    if not is_s3(url):
        raise StorageConfigError(f"not an s3:// URL: {redact_url(url)!r}")
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

    where = f"bucket {bucket!r} at endpoint {redact_url(endpoint) or 'AWS default (s3.amazonaws.com)'}"
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
            f"cannot reach S3 endpoint {redact_url(endpoint) or 'AWS default'} for bucket {bucket!r} "
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
