"""A local directory as a ``Storage``: create-once by hard link, compare-and-swap under a file lock."""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from sdbatch.storage.base import (
    COPY_CHUNK,
    PROBE_PREFIX,
    TMP_MARK,
    NotAnObject,
    NotFound,
    PutResult,
    StorageConfigError,
    StorageError,
    check_key,
    check_prefix,
    sha256_of,
)

log = logging.getLogger("sdbatch.storage")


@contextlib.contextmanager
def _writers_of(path: Path) -> Iterator[None]:
    """Hold the one writer's place of ``path``: an ``flock`` of a sidecar file (listings skip it),
    removed again while still held, so no OUT keeps an empty one. A writer that waited on a sidecar
    the holder removed meanwhile has locked a file nobody else will open: it sees the path no
    longer names the file it locked, and tries again on the new one."""
    sidecar = path.parent / f".{path.name}{TMP_MARK}cas-lock"
    while True:
        with open(sidecar, "a+b") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                current = os.stat(sidecar).st_ino == os.fstat(guard.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    sidecar.unlink(missing_ok=True)  # before the lock is released by closing
                return


class LocalStorage:
    """A directory. Create-once = write a temp file in the same dir, then ``os.link``."""

    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        self.root = root.absolute()
        self.url = self.root.as_uri()
        self._real_root = self.root.resolve()
        self._root_str, self._real_root_str = str(self.root), str(self._real_root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _file(self, key: str) -> str:
        """The file of ``key``. A key whose resolved path leaves OUT (a symlinked folder or
        file pointing elsewhere) is refused, for reads, writes and deletes alike. A ``str``, not a
        ``Path``: pathlib interns every name it parses, and verify reads every object of a job."""
        file = os.path.join(self._root_str, *check_key(key).split("/"))
        self._inside(file, key)
        return file

    def _path(self, key: str) -> Path:
        return Path(self._file(key))

    def _inside(self, path: str | Path, key: str) -> None:
        real = os.path.realpath(path)
        if real != self._real_root_str and not real.startswith(self._real_root_str + os.sep):
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
                            shutil.copyfileobj(source, f, COPY_CHUNK)
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
            return PutResult(created=False, sha256=sha256_of(stored), size=len(stored))
        except OSError as e:
            raise StorageError(
                f"cannot create {path}: {e} (create-once writes need a filesystem with hard links)"
            ) from e
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return PutResult(created=True, sha256=sha256_of(data), size=len(data))

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
        return data, sha256_of(data)

    def replace_if(self, key: str, data: bytes, tag: str) -> str | None:
        """Replace the object only if it still is the one ``tag`` names; its new tag, or None
        if it changed or is gone. Writers of a key serialise on ``_writers_of``."""
        path = self._path(key)
        if not path.parent.is_dir():
            return None
        with _writers_of(path):
            try:
                if sha256_of(path.read_bytes()) != tag:
                    return None
            except FileNotFoundError:
                return None
            self._replace(key, bytes(data))
        return sha256_of(data)

    def get(self, key: str) -> bytes:
        with self.open_read(key) as file:
            try:
                return file.read()
            except OSError as e:
                raise StorageError(f"cannot read {self._file(key)}: {e}") from e

    def open_read(self, key: str) -> BinaryIO:
        path = self._file(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise NotFound(f"{self.url}/{key} not found") from e
        except PermissionError as e:
            raise StorageConfigError(f"cannot read {path}: permission denied") from e
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e}") from e

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._file(key))

    def age(self, key: str) -> float:
        """Seconds since ``key`` was last written, by the filesystem's clock (its mtime)."""
        try:
            return time.time() - os.stat(self._file(key)).st_mtime
        except FileNotFoundError as e:
            raise NotFound(f"{self.url}/{key} not found") from e

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix)
        # Walk only the deepest directory the prefix names.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.is_dir():
            return []
        self._inside(base, base_rel or ".")
        out: list[str] = []
        folders = [(str(base), base_rel + "/" if base_rel else "")]
        while folders:
            folder, rel = folders.pop()
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:  # its last object deleted since it was listed, as on S3
                continue
            except OSError as e:
                raise StorageError(f"cannot list {self.url}/{rel}: {e}") from e
            for entry in entries:
                key = rel + entry.name
                # scandir's entries know whether they are links without a stat of each (the folder's
                # listing says so); a link out of OUT is refused, not skipped
                if entry.is_symlink():
                    self._inside(entry.path, key)
                if entry.is_dir():  # a link to a folder is neither a key nor walked into
                    if not entry.is_symlink() and ((key + "/").startswith(prefix) or prefix.startswith(key + "/")):
                        folders.append((entry.path, key + "/"))
                elif TMP_MARK not in entry.name and key.startswith(prefix):
                    out.append(key)
        out.sort()
        return out

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for key in self.list(prefix):
            try:
                # os.stat of a str: pathlib would intern every name, growing the interpreter's table with the rows
                yield key, os.stat(os.path.join(self.root, key)).st_size
            except FileNotFoundError:  # deleted since it was listed, as on S3
                continue

    def list_folder(self, prefix: str = "") -> Iterator[str]:
        """The keys directly under the folder ``prefix`` ("" or ending in "/") and its
        sub-folders (``prefix/name/``), in key order (a folder as its name with its "/")."""
        prefix = check_prefix(prefix)
        folder = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        if not folder.is_dir():
            return
        self._inside(folder, prefix or ".")
        entries = []
        with os.scandir(folder) as found:
            for entry in found:
                if TMP_MARK in entry.name:
                    continue
                if entry.is_symlink():  # a link out of OUT is refused, not skipped
                    self._inside(Path(entry.path), prefix + entry.name)
                entries.append(prefix + entry.name + ("/" if entry.is_dir() else ""))
        yield from sorted(entries)

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

    def delete_many(self, keys: builtins.list[str]) -> None:  # the method ``list`` shadows the type
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


def file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StorageConfigError(f"file:// URL with a host is not supported: {url!r}")
    from urllib.parse import unquote

    return unquote(parts.path)
