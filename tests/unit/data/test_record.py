"""The image record: row → record → index row (through the shard index's Parquet) → record is
the identity, for text-to-image, img2img and a row with adapters and passthrough columns; the
embedded JSON keeps the keys images have always carried. No Ray, no torch: the null model."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sdbatch
from sdbatch.data.index import STATUS_FAILED, STATUS_OK, index_schema
from sdbatch.data.record import (
    NO_CONDITIONING,
    ConditioningInputs,
    ImageRecord,
    conditioning_inputs,
    embedded_record,
    index_row,
)
from sdbatch.data.row import Row
from sdbatch.models.adapter import LoadRequest
from sdbatch.models.families.null import NullModel
from sdbatch.models.resolve import resolve
from sdbatch.output.commits import records_to_parquet
from sdbatch.run.plan import ShardSpec

PASSTHROUGH = {"label": pa.string(), "count": pa.int64()}
#: The keys of an image's embedded JSON record since LoRA support (clip_skip only when set,
#: size_conditioning only for SDXL): the on-disk format that must stay readable.
EMBEDDED_KEYS = {
    "id", "row", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler",
    "init_image", "strength", "loras", "prompt_truncated_at", "init_image_sha256", "shard", "batch_id",
    "batch_rows", "scheduler_config", "extra", "model_name", "model_family", "model_fingerprint", "model_hash",
    "device", "dtype", "versions", "torch_threads", "sdbatch_version",
}


@pytest.fixture(scope="module")
def null_generator():
    ref = resolve("builtin:null")  # loaded without the torch runtime: this file stays pure
    return NullModel.load(LoadRequest("builtin:null", ref.folder, ref.pin, ref.pin, ref.traits))


def a_row(**changes) -> Row:
    values = dict(index=3, id="r3", prompt="a red circle", negative_prompt="blurry", seed=5, steps=20,
                  guidance_scale=7.5, width=64, height=64, scheduler="ddim", extra={"label": None, "count": None})
    return Row(**{**values, **changes})


ROWS = {
    "txt2img": a_row(),
    "img2img": a_row(init_image="/data/init.png", strength=0.5),
    "loras+passthrough": a_row(loras=(("style", 0.8), ("ink", -0.25)), clip_skip=2,
                               extra={"label": "train", "count": 7}),
}


@pytest.mark.parametrize("kind", ROWS)
def test_row_record_index_row_record(kind, null_generator):
    row = ROWS[kind]
    init_sha = "ab" * 32 if row.is_img2img else None
    record = ImageRecord.from_row(row, ShardSpec(0, range(3, 6)).name, "00000-000", ["r2", "r3"],
                                  null_generator.facts(row), init_sha)
    assert record.row == row and record.batch_rows == ("r2", "r3") and record.init_image_sha256 == init_sha
    assert record.loras == tuple({"name": n, "scale": s, "sha256": None} for n, s in row.loras)

    entry = record.to_index_row(status=STATUS_OK, error=None, key="images/00000/r3.png", sha256="0" * 64,
                                bytes=123, attempt=1, worker="w", generate_seconds=0.5)
    schema = index_schema(PASSTHROUGH)
    assert list(entry) == [*schema.names[:len(entry) - len(PASSTHROUGH)], *PASSTHROUGH]  # every column, in order
    assert set(entry) == set(schema.names)
    # through the shard index's bytes, as verify and reproduce read it
    stored = pq.read_table(io.BytesIO(records_to_parquet([entry], schema, "fp"))).to_pylist()[0]
    back = ImageRecord.from_index_row(stored, null_generator.facts(row), model_name="builtin:null",
                                      sdbatch_version=sdbatch.__version__)
    assert back == record

    embedded = json.loads(json.dumps(record.to_embedded(), sort_keys=True))
    assert set(embedded) == EMBEDDED_KEYS | ({"clip_skip"} if row.clip_skip != 1 else set())
    assert embedded["model_hash"] == record.model_fingerprint[:10] and embedded["extra"] == row.extra
    assert ImageRecord.from_embedded(embedded) == record
    assert embedded_record(embedded, stored) == record
    assert embedded_record({**embedded, "seed": 6}, stored) is None  # another row's image at this key
    assert embedded_record({"parameters": "not ours"}, stored) is None


def test_a_failed_row_has_every_index_column_and_no_record_facts():
    entry = index_row(ROWS["loras+passthrough"], "00000", status=STATUS_FAILED, error="init image unreadable")
    assert set(entry) == set(index_schema(PASSTHROUGH).names)
    assert entry["batch_id"] is None and entry["status"] == STATUS_FAILED and entry["label"] == "train"
    assert entry["loras"] == [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": -0.25}]


def test_a_row_pickles_by_its_home_module():
    """Ray pickles rows by their class's module path: it must be the module that defines Row."""
    import pickle

    row = a_row()
    assert Row.__module__ == "sdbatch.data.row"
    assert pickle.loads(pickle.dumps(row)) == row


def test_a_batchs_conditioning_holds_the_kinds_its_rows_take_and_picks_rows_in_order():
    """``conditioning_inputs``: per row, the first image of each column it sets (a ControlNet row:
    all of them, in order); a kind the batch does not take is None. ``pick``: the rows asked for."""
    inpaint = [a_row(id=f"r{i}", init_image=f"/data/i{i}.png", strength=0.5, mask_image=f"/data/m{i}.png")
               for i in range(3)]
    loaded = [{"init_image": [(f"init{i}", "sha")], "mask_image": [(f"mask{i}", "sha")]} for i in range(3)]
    conditioning = conditioning_inputs(inpaint, loaded)
    assert conditioning == ConditioningInputs(init_images=("init0", "init1", "init2"), masks=("mask0", "mask1", "mask2"))
    assert conditioning.pick([2, 0, 2]) == ConditioningInputs(init_images=("init2", "init0", "init2"),
                                                              masks=("mask2", "mask0", "mask2"))

    controlled = [a_row(controlnet="edges:1,depth:0.5", control_image="/data/e.png|/data/d.png",
                        ip_adapter_image="/data/ref.png", ip_adapter_scale=0.6)]
    loaded = [{"control_image": [("edges", "sha"), ("depth", "sha")], "ip_adapter_image": [("ref", "sha")]}]
    assert conditioning_inputs(controlled, loaded) == ConditioningInputs(control_images=(("edges", "depth"),),
                                                                         ip_adapter_images=("ref",))
    assert conditioning_inputs([a_row()], [{}]) == NO_CONDITIONING == NO_CONDITIONING.pick(range(3))
