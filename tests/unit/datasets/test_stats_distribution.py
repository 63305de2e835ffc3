"""``datasets.stats``' score distributions, fed a batch at a time: exact up to the sample's size,
a bounded uniform sample beyond it. Pure."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.datasets import stats


def distribution(values: np.ndarray, batch: int) -> dict:
    tally = stats._Distribution()
    for start in range(0, len(values), batch):
        tally.add(pa.array(values[start:start + batch]))
    return tally.result()


def test_up_to_the_sample_size_the_figures_are_those_of_every_value(monkeypatch):
    monkeypatch.setattr(stats, "QUANTILE_SAMPLE", 1_000)
    values = np.random.default_rng(1).normal(50, 10, 1_000)
    quantiles = pc.quantile(pa.array(values), q=list(stats.QUANTILES)).to_pylist()
    assert distribution(values, batch=64) == {
        "count": 1_000, "mean": round(values.mean(), 4), "min": round(values.min(), 4),
        "p5": round(quantiles[0], 4), "p50": round(quantiles[1], 4), "p95": round(quantiles[2], 4),
        "max": round(values.max(), 4)}


def test_beyond_it_count_mean_min_max_stay_exact_and_the_quantiles_close(monkeypatch):
    monkeypatch.setattr(stats, "QUANTILE_SAMPLE", 2_000)
    values = np.random.default_rng(2).uniform(0, 100, 200_000)  # p5, p50, p95 = 5, 50, 95
    values[:100_000].sort()  # order must not bias the sample
    found = distribution(values, batch=4_096)
    assert (found["count"], found["mean"], found["min"], found["max"]) == (
        200_000, round(values.mean(), 4), round(values.min(), 4), round(values.max(), 4))
    assert abs(found["p5"] - 5) < 2 and abs(found["p50"] - 50) < 4 and abs(found["p95"] - 95) < 2


def test_nulls_are_left_out_and_a_column_of_only_nulls_has_none():
    tally = stats._Distribution()
    tally.add(pa.array([None, 1.0, None, 3.0]))
    assert tally.result()["count"] == 2 and tally.result()["mean"] == 2.0
    empty = stats._Distribution()
    empty.add(pa.nulls(5, pa.float64()))
    assert empty.result() is None
