"""Properties of the plan (sdbatch.run.plan), for any manifest hypothesis draws: every row in
exactly one shard, no shard over ``rows_per_shard``, a batch's rows share one batch key,
batches are full wherever the rows allow, the batch count the plan states is the one a worker
forms, and the pending shards are all shards minus the committed ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sdbatch.data.row import Row
from sdbatch.run.plan import canonical_batches, key_codes, make_plan

SIZES = [(64, 64), (128, 64), (64, 128)]
SAMPLERS = ["ddim", "euler_a"]


@st.composite
def manifests(draw) -> tuple[list[Row], int, int]:
    """Rows whose batch keys (size × sampler) interleave as drawn, with a shard and a batch size."""
    keys = draw(st.lists(st.tuples(st.sampled_from(SIZES), st.sampled_from(SAMPLERS)), max_size=120))
    rows = [Row(index=i, id=f"r{i}", prompt="p", negative_prompt="", seed=i, steps=4, guidance_scale=7.5,
                width=w, height=h, scheduler=sampler) for i, ((w, h), sampler) in enumerate(keys)]
    return rows, draw(st.integers(1, 20)), draw(st.integers(1, 10))


@given(manifests())
def test_every_row_is_planned_exactly_once_in_batches_of_one_key(manifest):
    rows, rows_per_shard, batch_size = manifest
    plan = make_plan(len(rows), rows_per_shard, batch_size, key_codes(r.batch_key() for r in rows))
    shards = list(plan.pending())
    assert sorted(i for s in shards for i in s.rows) == list(range(len(rows)))
    assert all(0 < s.num_rows <= rows_per_shard for s in shards)
    assert list(plan.shard_sizes()) == [s.num_rows for s in shards]

    batches_per_shard = [canonical_batches([rows[i] for i in s.rows], batch_size) for s in shards]
    batches = [b for shard_batches in batches_per_shard for b in shard_batches]
    assert plan.num_batches == len(batches)
    assert all(len({r.batch_key() for r in b}) == 1 for b in batches)
    for shard_batches in batches_per_shard:  # inside a shard, only a key's last batch may be short
        last_of_key = {b[0].batch_key(): b for b in shard_batches}
        assert all(len(b) == batch_size or last_of_key[b[0].batch_key()] is b for b in shard_batches)
    if rows_per_shard % batch_size == 0:  # across the plan: at most one short batch per key
        assert sum(len(b) < batch_size for b in batches) <= len({r.batch_key() for r in rows})


@given(manifests(), st.data())
def test_pending_is_every_shard_but_the_committed(manifest, data):
    rows, rows_per_shard, batch_size = manifest
    plan = make_plan(len(rows), rows_per_shard, batch_size, key_codes(r.batch_key() for r in rows))
    names = [plan.shard(i).name for i in range(plan.num_shards)]
    beyond = f"{plan.num_shards + data.draw(st.integers(0, 5)):05d}"  # a commit no shard of this plan has
    committed = data.draw(st.sets(st.sampled_from(names))) if names else set()
    pending = plan.pending(committed | {beyond})
    assert [s.name for s in pending] == [n for n in names if n not in committed]
    assert pending.num_rows == sum(s.num_rows for s in pending)
    assert pending.num_rows + sum(plan.shard(int(n)).num_rows for n in committed) == len(rows)
