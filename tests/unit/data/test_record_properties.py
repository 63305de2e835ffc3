"""Properties of the image record (sdbatch.data.record) for any row hypothesis draws: a row
survives its index row (through the shard index's Parquet bytes), and a record survives the
JSON embedded in its image — both ways, and the embedded record is found to describe its row's
index entry. Only the public round-trip functions are used (``index_row``, ``row_from_stored``,
``passthrough_of``, ``to_embedded``/``from_embedded``, ``embedded_record``), not how a record
is made from a model; tests/unit/data/test_record.py covers that with the null model."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given
from hypothesis import strategies as st

from sdbatch.data.columns import record_parameters
from sdbatch.data.index import STATUS_OK, index_schema
from sdbatch.data.record import ImageRecord, embedded_record, index_row, passthrough_of, row_from_stored
from sdbatch.data.row import MAX_SEED, Row
from sdbatch.data.samplers import SCHEDULERS
from sdbatch.output.commits import records_to_parquet

PASSTHROUGH = {"label": pa.string(), "count": pa.int64()}
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # what UTF-8 Parquet strings hold
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
FRACTION = st.floats(0, 1, exclude_min=True, exclude_max=True)
SIDE = st.none() | st.integers(8, 256).map(lambda n: 8 * n)


@st.composite
def rows(draw) -> Row:
    init_image = draw(st.none() | st.just("inputs/init.png") | st.just("s3://bucket/init.png"))
    return Row(
        index=draw(st.integers(0, 2**40)), id=draw(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)),
        prompt=draw(TEXT), negative_prompt=draw(TEXT), seed=draw(st.integers(0, MAX_SEED - 1)),
        steps=draw(st.integers(1, 150)), guidance_scale=draw(st.floats(0, 30)), width=draw(SIDE), height=draw(SIDE),
        scheduler=draw(st.sampled_from(SCHEDULERS)), init_image=init_image,
        strength=draw(FRACTION) if init_image else 0.75, refiner_switch=draw(st.none() | FRACTION),
        clip_skip=draw(st.integers(1, 12)),
        loras=tuple(draw(st.lists(st.tuples(NAME, st.floats(-4, 4)), max_size=3, unique_by=lambda a: a[0]))),
        extra={"label": draw(st.none() | TEXT), "count": draw(st.none() | st.integers(-(2**63), 2**63 - 1))},
    )


def through_parquet(entry: dict) -> dict:
    """The index row as verify and reproduce read it back: from the shard index's bytes."""
    return pq.read_table(io.BytesIO(records_to_parquet([entry], index_schema(PASSTHROUGH), "fp"))).to_pylist()[0]


@given(rows())
def test_a_row_survives_its_index_row(row):
    entry = through_parquet(index_row(row, "00007", status=STATUS_OK, key=f"images/{row.id}.png"))
    assert row_from_stored(entry, passthrough_of(entry)) == row
    assert passthrough_of(entry) == row.extra


@st.composite
def records(draw) -> ImageRecord:
    """A record as an image embeds it: the row's parameters and the generation facts."""
    row = draw(rows())
    fingerprint = draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
    hexes = st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
    embedded = {
        **record_parameters(row.parameters()),
        "loras": [{"name": name, "scale": scale, "sha256": draw(hexes)} for name, scale in row.loras],
        "prompt_truncated_at": draw(st.none() | st.integers(0, len(row.prompt))),
        "init_image_sha256": draw(hexes) if row.init_image else None,
        "shard": "00007", "batch_id": "00007-001",
        "batch_rows": [row.id, *draw(st.lists(st.from_regex(r"r[0-9]{1,4}", fullmatch=True), max_size=3))],
        "scheduler_config": draw(st.dictionaries(NAME, st.integers() | st.booleans() | TEXT, max_size=3)),
        "extra": row.extra, "model_name": draw(NAME), "model_family": draw(st.sampled_from(["sd", "sdxl", "sd3"])),
        "model_fingerprint": fingerprint, "model_hash": fingerprint[:10],
        "device": draw(st.sampled_from(["cpu", "cuda"])), "dtype": draw(st.sampled_from(["float32", "float16"])),
        "versions": draw(st.dictionaries(NAME, NAME, max_size=3)), "torch_threads": draw(st.none() | st.integers(1, 64)),
        "sdbatch_version": draw(st.none() | st.just("0.1.0")),
    }
    if row.refiner_switch is not None:
        embedded |= {"refiner_name": draw(NAME), "refiner_fingerprint": draw(hexes)}
    record = ImageRecord.from_embedded(embedded)
    assert record.row == row
    return record


@given(records())
def test_a_record_survives_the_json_its_image_embeds(record):
    embedded = json.loads(json.dumps(record.to_embedded()))
    assert ImageRecord.from_embedded(embedded) == record
    assert json.loads(json.dumps(ImageRecord.from_embedded(embedded).to_embedded())) == embedded
    entry = through_parquet(index_row(record.row, record.shard, batch_id=record.batch_id, status=STATUS_OK))
    assert embedded_record(embedded, entry) == record
    other_seed = (record.row.seed + 1) % 2**63
    assert embedded_record({**embedded, "seed": other_seed}, entry) is None  # another row's image at this key

