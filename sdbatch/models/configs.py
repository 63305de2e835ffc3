"""Reading a model folder's JSON configs, locally or from storage, without loading the model."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdbatch.models.builtin import local_model_dir
from sdbatch.models.errors import ModelError
from sdbatch.storage.locations import is_s3

#: A model folder's JSON files: relative path -> parsed JSON, or None where there is no such file.
JsonReader = Callable[[str], Any]


def folder_json_reader(folder: Path) -> JsonReader:
    """The JSON files of a local model folder, each read (and parsed) at most once."""

    @functools.cache
    def read(rel: str) -> Any:
        path = folder / rel
        return _parse_json(path.read_bytes(), rel, str(folder)) if path.is_file() else None

    return read


def storage_json_reader(storage: Any, where: str) -> JsonReader:
    """The JSON files under an ``s3://`` model prefix, each read at most once; ModelError when
    the prefix cannot be read."""
    from sdbatch.storage.base import NotFound, StorageError

    @functools.cache
    def read(rel: str) -> Any:
        try:
            return _parse_json(storage.get(rel), rel, where)
        except NotFound:
            return None
        except StorageError as exc:
            raise ModelError(f"model {where!r}: {exc}") from None

    return read


def _parse_json(data: bytes, rel: str, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ModelError(f"model at {where}: {rel} is not valid JSON; pass a diffusers folder as written by "
                         "save_pretrained") from None


def model_json_reader(name: str, endpoint_url: str | None = None) -> JsonReader:
    """The JSON reader of ``builtin:NAME``, a local folder or an ``s3://`` prefix (which must
    hold a model_index.json), for its configs alone (no listing, no pin)."""
    if not is_s3(name):
        return folder_json_reader(local_model_dir(name))
    from sdbatch.storage.base import StorageError
    from sdbatch.storage.open import open_storage

    try:
        read = storage_json_reader(open_storage(name, endpoint_url=endpoint_url), name)
    except StorageError as exc:
        raise ModelError(f"model {name!r}: {exc}") from None
    if read("model_index.json") is None:
        raise ModelError(f"model {name!r}: no model_index.json under that prefix; it must hold a diffusers folder")
    return read
