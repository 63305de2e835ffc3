"""Where a job's images live: the two output layouts behind one interface (design.md §5.1).

    format=files       OUT/images/NNNNN/<id>.<ext>   one object per image
    format=webdataset  OUT/shards/NNNNN.tar          one tar per shard: <key>.<ext> + <key>.json

``layout_for(storage, spec.output)`` picks one. A ``ShardWriter`` stores a shard's images
(``add``, on any thread: files are written create-once as they come, a webdataset shard's
bytes are held) and ``finish`` says where each row's image is — its index ``key`` — after
writing the tar, if any. Readers go through ``read`` (an image by its index key), ``objects``
(the storage objects index keys name) and ``check`` (every entry's object present, of the
recorded size and sha256); ``differs`` says whether bytes read are the ones a row recorded.
The index key of a tar member, ``shards/NNNNN.tar#<key>.<ext>``, is made and parsed only
here. A key already taken is adopted only when it holds exactly the bytes this job just
produced; anything else is not ours (``foreign_object_error``).
Imports: ``encode`` (file extensions), ``storage``. Pure.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdbatch.output.encode import extension
from sdbatch.storage.base import NotAnObject, NotFound, Storage, StorageError

IMAGES_PREFIX = "images/"
TARS_PREFIX = "shards/"
#: Where either layout writes (verify lists both: an object of the other layout is an orphan too).
PREFIXES = (IMAGES_PREFIX, TARS_PREFIX)
_MEMBER_MARK = "#"  # index key of a tar member: <tar key>#<member name>


def image_key(shard_name: str, row_id: str, ext: str) -> str:
    return f"{IMAGES_PREFIX}{shard_name}/{row_id}.{ext}"


def tar_key(unit: str) -> str:
    return f"{TARS_PREFIX}{unit}.tar"


def webdataset_key(row_id: str) -> str:
    """webdataset splits a member name at its first dot, so dots in ids are escaped."""
    return row_id.replace(".", "%2E")


def object_key(index_key: str) -> str:
    """The storage object an index key names (a tar member's tar)."""
    return index_key.partition(_MEMBER_MARK)[0]


def foreign_object_error(key: str, stored_sha256: str, ours_sha256: str) -> str:
    """The error of a row whose key already holds an object that is not its bytes."""
    return (f"{key} already holds an object that is not this row's image (stored sha256 {stored_sha256[:16]}…, "
            f"this row's {ours_sha256[:16]}…): sdbatch adopts only the bytes it just produced. Delete {key} "
            "and rerun with --retry-failed")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Placed:
    """Where one row's image went: its index key, whether this attempt created the object
    (False: adopted from an earlier attempt), or why it is not the row's (a foreign object)."""

    key: str
    created: bool
    error: str | None = None


@dataclass
class Checked:
    """``Layout.check``'s findings: entries whose object is intact, missing ones (id, key),
    mismatched ones (id, key, what differs), and stored members no entry names."""

    good: list[dict[str, Any]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)
    orphan_members: list[str] = field(default_factory=list)

    def add(self, entry: dict[str, Any], problem: str | None) -> None:
        """Sort ``entry`` by what ``judge`` said of its object."""
        if problem == MISSING:
            self.missing.append((entry["id"], entry["key"]))
        elif problem:
            self.mismatched.append((entry["id"], entry["key"], problem))
        else:
            self.good.append(entry)


MISSING = "missing"  # ``judge``'s word for an object that is not there


def judge(entry: dict[str, Any], data: bytes | None) -> str | None:
    """How the object's bytes ``data`` (None: not there) differ from what ``entry`` recorded:
    ``MISSING``, what differs, or None. Run where the bytes were read, so only the verdict is kept."""
    return MISSING if data is None else differs(entry, data)


def size_differs(size: int, recorded: int) -> str:
    return f"size {size} ≠ recorded {recorded}"


def differs(entry: dict[str, Any], data: bytes) -> str | None:
    """How ``data`` differs from the image index row ``entry`` recorded (its ``bytes`` and
    ``sha256``); None when it is that image. Every reader of stored images asks this."""
    problems = []
    if len(data) != entry["bytes"]:
        problems.append(size_differs(len(data), entry["bytes"]))
    if sha256(data) != entry["sha256"]:
        problems.append("sha256 differs")
    return ", ".join(problems) or None


class ShardWriter:
    """Stores the images of one shard (or of the rows of one ``--retry-failed`` unit)."""

    def __init__(self, storage: Storage, ext: str, shard_name: str, unit: str):
        self.storage, self.ext, self.shard_name, self.unit = storage, ext, shard_name, unit
        self._lock = threading.Lock()

    def add(self, row_id: str, data: bytes, digest: str, record: dict[str, Any]) -> None:
        """Store ``row_id``'s image ``data`` (sha256 ``digest``; ``record``: its JSON record)."""
        raise NotImplementedError

    def finish(self, row_ids: list[str]) -> dict[str, Placed]:
        """Write what the shard still holds; where each of ``row_ids`` (rows added, in the
        order they were generated: a tar's member order) is."""
        raise NotImplementedError

    def _put_new(self, key: str, data: bytes, digest: str) -> tuple[bool, str | None]:
        """Store ``data`` (sha256 ``digest``) create-once at ``key``: (created, error). A key
        already taken is adopted only when it holds exactly these bytes; one a directory or a
        link to nothing holds is that row's error, like foreign bytes."""
        try:
            put = self.storage.put_new(key, data)
        except NotAnObject as exc:  # that row's key only: the rest of the shard is stored
            return False, f"{exc}: remove {key} and rerun with --retry-failed"
        ours = put.created or put.sha256 == digest
        return put.created, None if ours else foreign_object_error(key, put.sha256, digest)


class _FileWriter(ShardWriter):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self._placed: dict[str, Placed] = {}

    def add(self, row_id: str, data: bytes, digest: str, record: dict[str, Any]) -> None:
        key = image_key(self.shard_name, row_id, self.ext)
        created, error = self._put_new(key, data, digest)
        with self._lock:
            self._placed[row_id] = Placed(key, created, error)

    def finish(self, row_ids: list[str]) -> dict[str, Placed]:
        return {rid: self._placed[rid] for rid in row_ids}


def tar_json(record: dict[str, Any]) -> bytes:
    """A tar sample's ``<key>.json``: the image's record with its labels (the record's
    ``extra``) also at the top level, as an export's samples carry them — the record's own keys
    win a clash; ``extra`` keeps every label."""
    return json.dumps({**(record.get("extra") or {}), **record}, sort_keys=True).encode()


class _TarWriter(ShardWriter):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self._members: dict[str, tuple[bytes, bytes]] = {}

    def add(self, row_id: str, data: bytes, digest: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._members[row_id] = (data, tar_json(record))

    def finish(self, row_ids: list[str]) -> dict[str, Placed]:
        if not row_ids:
            return {}
        key = tar_key(self.unit)
        tar = _deterministic_tar([(webdataset_key(rid), *self._members[rid]) for rid in row_ids], self.ext)
        created, error = self._put_new(key, tar, sha256(tar))
        return {rid: Placed(f"{key}{_MEMBER_MARK}{webdataset_key(rid)}.{self.ext}", created, error)
                for rid in row_ids}


def _deterministic_tar(members: list[tuple[str, bytes, bytes]], image_ext: str) -> bytes:
    """A tar with fixed mtimes/owners, in row order, of ``<key>.<ext>`` + ``<key>.json``, so
    a retried shard produces the same bytes and adopts an earlier attempt's object."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, image_bytes, json_bytes in members:
            for name, data in ((f"{key}.{image_ext}", image_bytes), (f"{key}.json", json_bytes)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_members(data: bytes) -> dict[str, bytes]:
    """A tar's regular members by name (``tarfile.TarError`` if it is not a readable tar)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: file.read() for m in tar.getmembers() if m.isfile() and (file := tar.extractfile(m)) is not None}


class Layout:
    """One output format's images on ``storage``."""

    format = ""
    _writer: type[ShardWriter] = ShardWriter
    prefix = ""  # the folder this layout writes under (the other layout's is foreign to it)
    listed_sizes = True  # whether a listing shows each row's recorded size (a tar's is not a member's)

    def __init__(self, storage: Storage, image_format: str = "png"):
        self.storage = storage
        self.ext = extension(image_format)

    def writer(self, shard_name: str, unit: str | None = None) -> ShardWriter:
        """A writer of ``shard_name``'s images; ``unit`` names its objects where the layout
        groups them (webdataset: a ``--retry-failed`` unit writes its own tar)."""
        return self._writer(self.storage, self.ext, shard_name, unit or shard_name)

    def read(self, key: str) -> bytes:
        """The image an index ``key`` names. ``NotFound`` when it is not there; ``StorageError``
        when its object cannot be read."""
        raise NotImplementedError

    def shard_prefix(self, shard_name: str) -> str:
        """The listing prefix that holds every object of ``shard_name`` (and maybe others':
        ``owner`` tells)."""
        raise NotImplementedError

    def listing_prefixes(self, shard_names: Iterable[str]) -> list[str]:
        """The listing prefixes that hold every object of ``shard_names`` (and maybe others':
        ``owner`` tells): each one's ``shard_prefix``."""
        return sorted({self.shard_prefix(name) for name in shard_names})

    def owner(self, key: str) -> str | None:
        """The shard whose objects the storage key or folder ``key`` holds (None: no shard's)."""
        raise NotImplementedError

    def objects(self, keys: list[str]) -> set[str]:
        """The storage objects the index keys ``keys`` name."""
        return {object_key(k) for k in keys if k}

    def check(self, entries: list[dict[str, Any]], threads: int = 16) -> Checked:
        """Every entry's object present, with its recorded ``bytes`` and ``sha256``."""
        raise NotImplementedError


class FilesLayout(Layout):
    format = "files"
    _writer = _FileWriter
    prefix = IMAGES_PREFIX

    def shard_prefix(self, shard_name: str) -> str:
        return f"{IMAGES_PREFIX}{shard_name}/"

    def owner(self, key: str) -> str | None:
        folder, slash, _ = key.removeprefix(IMAGES_PREFIX).partition("/")
        return folder if key.startswith(IMAGES_PREFIX) and slash else None

    def read(self, key: str) -> bytes:
        return self.storage.get(key)

    def check(self, entries: list[dict[str, Any]], threads: int = 16) -> Checked:
        def verdict(entry: dict[str, Any]) -> str | None:
            try:
                return judge(entry, self.storage.get(entry["key"]))
            except NotFound:
                return MISSING

        checked = Checked()
        with ThreadPoolExecutor(threads, thread_name_prefix="sdbatch-verify") as pool:
            for entry, problem in zip(entries, pool.map(verdict, entries)):
                checked.add(entry, problem)
        return checked


class WebdatasetLayout(Layout):
    format = "webdataset"
    _writer = _TarWriter
    prefix = TARS_PREFIX
    listed_sizes = False

    def shard_prefix(self, shard_name: str) -> str:
        return f"{TARS_PREFIX}{shard_name}"

    def listing_prefixes(self, shard_names: Iterable[str]) -> list[str]:
        """One prefix per hundred shard numbers: the tars lie in one flat folder, which a local
        listing walks whole for any prefix, so a few shards' tars are listed once or twice, not
        once per shard (quadratic in the job's shards)."""
        prefixes = {self.shard_prefix(name) for name in shard_names}
        return sorted({p[:-2] if p[-2:].isdigit() else p for p in prefixes})

    def owner(self, key: str) -> str | None:
        """A shard's tar is ``shards/<shard>.tar``; a ``--retry-failed`` unit's ``shards/<shard>-….tar``."""
        name = key.removeprefix(TARS_PREFIX)
        if not key.startswith(TARS_PREFIX) or "/" in name or not name.endswith(".tar"):
            return None
        return name.removesuffix(".tar").partition("-")[0]

    def __init__(self, storage: Storage, image_format: str = "png"):
        super().__init__(storage, image_format)
        self._last: tuple[str, dict[str, bytes]] | None = None  # readers go tar by tar: read each once

    def _members(self, tar: str) -> dict[str, bytes]:
        last = self._last
        if last is not None and last[0] == tar:
            return last[1]
        try:
            members = tar_members(self.storage.get(tar))
        except tarfile.TarError as exc:
            raise StorageError(f"{tar} is not a readable tar: {exc}") from None
        self._last = (tar, members)
        return members

    def read(self, key: str) -> bytes:
        tar, _, member = key.partition(_MEMBER_MARK)
        members = self._members(tar)
        if member not in members:
            raise NotFound(f"{tar} has no member {member}")
        return members[member]

    def check(self, entries: list[dict[str, Any]], threads: int = 16) -> Checked:
        by_tar: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_tar.setdefault(object_key(entry["key"]), []).append(entry)

        def verdicts(tar: str) -> tuple[list[str | None], list[str]]:
            """Each entry of ``tar``'s verdict, and its members no entry names."""
            try:
                members = tar_members(self.storage.get(tar))
            except NotFound:
                return [MISSING] * len(by_tar[tar]), []
            except tarfile.TarError as exc:
                return [f"not a readable tar: {exc}"] * len(by_tar[tar]), []
            named = set()
            found = []
            for e in by_tar[tar]:
                member = e["key"].partition(_MEMBER_MARK)[2]
                named |= {member, member.rsplit(".", 1)[0] + ".json"}
                found.append(judge(e, members.get(member)))
            return found, [f"{tar}{_MEMBER_MARK}{m}" for m in sorted(members) if m not in named]

        checked = Checked()
        with ThreadPoolExecutor(threads, thread_name_prefix="sdbatch-verify") as pool:
            for tar, (found, orphans) in zip(by_tar, pool.map(verdicts, by_tar)):
                for e, problem in zip(by_tar[tar], found):
                    checked.add(e, problem)
                checked.orphan_members.extend(orphans)
        return checked


LAYOUTS: dict[str, type[Layout]] = {cls.format: cls for cls in (FilesLayout, WebdatasetLayout)}


def layout_for(storage: Storage, output: Any) -> Layout:
    """The layout ``output`` (``spec.output``: its ``format`` and ``image_format``) writes."""
    return LAYOUTS[output.format](storage, output.image_format)
