"""The output index's columns and types, in order: the row's columns, the result columns, the
quality columns, then passthrough columns (design.md §4.4). The one owner of the index schema:
every other module reads it from here. Also the key of the job record, which marks a folder as
an OUT."""

from __future__ import annotations

import pyarrow as pa

from sdbatch.data.columns import COLUMNS

#: The columns the output index adds to each row's parameters (``worker.index_row``), in index
#: order, with their types (the quality columns, ``quality.QUALITY_COLUMN_TYPES``, follow them).
RESULT_COLUMNS: dict[str, pa.DataType] = {
    "shard": pa.string(), "batch_id": pa.string(), "batch_rows": pa.list_(pa.string()),
    "model_fingerprint": pa.string(),
    "refiner_fingerprint": pa.string(),  # the refiner's sha256 fingerprint for refined rows; null: base only
    "device": pa.string(), "dtype": pa.string(), "torch_threads": pa.int64(),
    "versions": pa.string(), "init_image_sha256": pa.string(),
    "mask_image_sha256": pa.string(),  # inpainting: of the mask's bytes as read; null: no mask
    # a ControlNet row's: each ControlNet's name, scale and folder fingerprint, and each control image's sha256
    "controlnets": pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64()), ("sha256", pa.string())])),
    "control_image_sha256": pa.list_(pa.string()),
    "ip_adapter_image_sha256": pa.string(),  # an IP-Adapter row's: of its reference image's bytes as read
    "prompt_truncated_at": pa.int64(),  # the prompt character where the text encoder stopped reading; null: all read
    "status": pa.string(), "error": pa.string(),
    "key": pa.string(), "sha256": pa.string(), "bytes": pa.int64(), "attempt": pa.int64(), "worker": pa.string(),
    "generate_seconds": pa.float64(),
}


def index_types() -> dict[str, pa.DataType]:
    """The index's type of each column."""
    return {c.name: c.stored_type for c in COLUMNS}


#: The quality columns of the index and their types (``output.INDEX_COLUMN_TYPES`` holds them).
QUALITY_COLUMN_TYPES: dict[str, pa.DataType] = {
    "phash": pa.string(),
    "colour_hash": pa.string(),
    "luma_mean": pa.float64(),
    "luma_std": pa.float64(),
    "blank": pa.bool_(),
    "clip_score": pa.float64(),
    "duplicate_of": pa.string(),
}


STATUS_OK = "ok"


STATUS_FAILED = "failed"


#: The index's own columns and their types, in index order; passthrough columns follow with
#: their manifest types. A shard index infers its types from its values, so a column that is
#: null throughout one shard (``strength`` in a text-to-image shard) is typed here.
INDEX_COLUMN_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(), "row": pa.int64(), **{name: t for name, t in index_types().items() if name != "id"},
    **RESULT_COLUMNS, **QUALITY_COLUMN_TYPES,
}


def index_schema(passthrough_types: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([*INDEX_COLUMN_TYPES.items(), *passthrough_types.items()])


#: The columns the output index adds to each row's parameters (``worker.index_row``).
INDEX_RESULT_COLUMNS = (*RESULT_COLUMNS, *QUALITY_COLUMN_TYPES)


#: A passthrough column with one of these names would overwrite the index's own (say,
#: ``status``), so validation refuses it.
RESERVED_COLUMNS = ("row", *INDEX_RESULT_COLUMNS)


#: The generation facts of a record that its index row stores (besides the row's parameters).
INDEXED = ("shard", "batch_id", "batch_rows", "model_fingerprint", "device", "dtype", "torch_threads", "versions",
           "init_image_sha256", "prompt_truncated_at", "refiner_fingerprint", "mask_image_sha256", "controlnets",
           "control_image_sha256", "ip_adapter_image_sha256")
assert set(INDEXED) <= set(RESULT_COLUMNS), "every indexed record field is a declared index column"


#: The job record's key under OUT: a folder holding it is an OUT, never a manifest source.
JOB_KEY = "_sdbatch/job.json"
