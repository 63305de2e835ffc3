"""plan.py, pure: shards grouped by batch key (full batches on mixed manifests), the one-key
plan equal to contiguous row ranges, every row exactly once, and the same plan every time."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sdbatch.data.row import Row
from sdbatch.run.plan import canonical_batches, key_codes, make_plan

SIZES = [(512, 512), (768, 512), (512, 768), (1024, 1024)]
SAMPLERS = ["ddim", "euler_a", "dpmpp_2m"]


def mixed_rows(n: int) -> list[Row]:
    """``n`` rows interleaving 4 sizes × 3 samplers, row by row (the worst case for ranges)."""
    combos = list(itertools.product(SIZES, SAMPLERS))
    rows = []
    for i in range(n):
        (w, h), sampler = combos[i % len(combos)]
        rows.append(Row(index=i, id=f"r{i:04d}", prompt=f"p{i}", negative_prompt="", seed=i, steps=4,
                        guidance_scale=7.5, width=w, height=h, scheduler=sampler))
    return rows


def plan_batches(plan, rows: list[Row]) -> list[list[Row]]:
    """The batches a worker forms from each shard's rows, in shard order."""
    return [b for shard in plan.pending() for b in canonical_batches([rows[i] for i in shard.rows], plan.batch_size)]


def test_one_key_plan_is_the_contiguous_ranges():
    for codes in (None, np.zeros(14, np.int32)):
        plan = make_plan(14, 6, 4, codes)
        assert [s.rows for s in plan.pending()] == [range(0, 6), range(6, 12), range(12, 14)]
        assert plan.num_batches == 5  # 4+2, 4+2, 2
    assert [s.name for s in make_plan(14, 6, 4).pending({"00001"})] == ["00000", "00002"]


@pytest.mark.parametrize("num_rows", [384, 1000])
def test_mixed_manifest_batches_are_full(num_rows):
    rows = mixed_rows(num_rows)
    codes = key_codes(r.batch_key() for r in rows)
    plan = make_plan(num_rows, 64, 8, codes)
    batches = plan_batches(plan, rows)
    sizes = [len(b) for b in batches]
    assert plan.num_batches == len(batches)
    assert all(len({r.batch_key() for r in b}) == 1 for b in batches)
    # every row exactly once, every shard within rows_per_shard
    assert sorted(r.index for b in batches for r in b) == list(range(num_rows))
    assert all(0 < s.num_rows <= 64 for s in plan.pending())
    assert np.mean(sizes) >= 0.9 * 8
    assert plan.batch_fill == pytest.approx(np.mean(sizes) / 8)
    assert sum(size < 8 for size in sizes) <= 12  # at most one short batch per batch key
    if num_rows == 384:  # 12 keys × 32 rows: every batch full, two keys per shard
        assert sizes == [8] * 48 and plan.num_shards == 6
    # the old contiguous 64-row shards would have given about 5 rows per batch
    ranges = [b for s in make_plan(num_rows, 64, 8).pending() for b in canonical_batches(rows[s.rows.start:s.rows.stop], 8)]
    assert num_rows / len(ranges) < 6


def test_plan_is_a_pure_function_of_the_keys():
    rows = mixed_rows(500)
    codes = key_codes(r.batch_key() for r in rows)
    first, again = make_plan(500, 64, 8, codes), make_plan(500, 64, 8, codes.copy())
    assert [s.rows for s in first.pending()] == [s.rows for s in again.pending()]
    assert first.shard(3) == again.shard(3)
    # committed shards are subtracted by name; the rest are unchanged
    assert [s.rows for s in first.pending({"00000", "00002"})] == [s.rows for s in first.pending() if s.index not in (0, 2)]


def test_tails_of_small_keys_share_shards():
    # key 0: 70 rows (one full shard + a tail of 6); keys 1..4: 5 rows each (tails only)
    codes = [0] * 70 + [k for k in range(1, 5) for _ in range(5)]
    plan = make_plan(len(codes), 64, 8, codes)
    shards = [list(s.rows) for s in plan.pending()]
    assert shards[0] == list(range(64))
    assert shards[1] == list(range(64, 90))  # 6 + 4×5 rows: one tail shard
    assert plan.num_batches == 8 + 1 + 4


def test_key_codes_number_keys_by_first_appearance():
    assert key_codes([("b",), ("a",), ("b",), ("c",)]).tolist() == [0, 1, 0, 2]


def test_a_shard_outside_the_plan_is_refused():
    with pytest.raises(IndexError, match="outside this plan's 3 shards"):
        make_plan(14, 6, 4).shard(3)
