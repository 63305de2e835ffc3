"""The download cache of remote model folders: fetched once per pin, marked complete, reused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

from sdbatch.storage.base import TMP_MARK, NotFound, StorageError, check_key
from sdbatch.storage.s3 import S3Storage
from sdbatch.storage.s3_client import _error_code, _is_botocore_error, _translate, parse_s3_url, s3_endpoint

log = logging.getLogger("sdbatch.storage")


MODEL_MARKER = ".sdbatch-complete.json"


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

    from sdbatch.models.pins import s3_pin

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
        check_key(rel)
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
