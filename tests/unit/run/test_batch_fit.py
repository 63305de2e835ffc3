"""Batch size from memory, with the probe injected: a device of known capacity, a model whose
peak memory is a fixed cost plus a cost per row; the size found is the largest that fits under
the headroom, the ceiling bounds it, each batch key is measured once, and a probe that lies
(the estimate does not fit) is halved until one fits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sdbatch.run.batch_fit import BatchFit, parts

GiB = 2**30


@dataclass(frozen=True)
class FakeRow:
    width: int
    steps: int = 20

    @property
    def height(self) -> int:
        return self.width

    def batch_key(self) -> tuple:
        return (self.width, self.steps)


class Device:
    """Peak = weights + per-pixel activations × rows; rows over the capacity run out of memory."""

    def __init__(self, capacity: int, weights: int = 5 * GiB, per_pixel: int = 4000, fits_below: int | None = None):
        self.capacity, self.weights, self.per_pixel, self.fits_below = capacity, weights, per_pixel, fits_below
        self.probed: list[tuple[int, int]] = []

    def probe(self, rows, conditioning):
        self.probed.append((rows[0].width, len(rows)))
        peak = self.weights + self.per_pixel * rows[0].width ** 2 * len(rows)
        too_many = self.fits_below is not None and len(rows) >= self.fits_below
        return None if peak > self.capacity or too_many else peak


def test_a_ceiling_that_fits_costs_one_probe():
    device = Device(80 * GiB)
    fit = BatchFit(8, device.probe, device.capacity)
    assert fit.size_for([FakeRow(512)] * 8) == 8
    assert fit.size_for([FakeRow(512)] * 3) == 8  # the same key: measured once
    assert device.probed == [(512, 8)]


def test_the_largest_size_under_the_headroom_is_found_per_key():
    device = Device(80 * GiB)
    fit = BatchFit(64, device.probe, device.capacity)
    size = fit.size_for([FakeRow(1024)] * 64)
    budget = 0.9 * 80 * GiB
    assert device.weights + device.per_pixel * 1024**2 * size <= budget < device.weights + device.per_pixel * 1024**2 * (size + 1)
    assert size == 17
    assert device.probed == [(1024, 64), (1024, 1), (1024, 2), (1024, 17)]  # the estimate checked
    assert fit.size_for([FakeRow(512)] * 64) == 64  # a smaller image: another key, the ceiling fits
    assert fit.sizes == {(1024, 20): 17, (512, 20): 64}


def test_an_estimate_that_does_not_fit_is_halved_and_a_row_that_does_not_fit_is_left_to_the_guard():
    device = Device(80 * GiB, fits_below=9)  # something the per-row estimate does not see
    assert BatchFit(64, device.probe, device.capacity).size_for([FakeRow(1024)] * 4) == 8
    assert device.probed[-2:] == [(1024, 17), (1024, 8)]
    assert BatchFit(8, Device(1 * GiB).probe, 1 * GiB).size_for([FakeRow(64)]) == 1
    assert BatchFit(1, lambda rows, conditioning: pytest.fail("never probed"), GiB).size_for([FakeRow(64)]) == 1


def test_parts_cover_the_rows_in_order():
    assert parts(list(range(7)), 3) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert [list(range(7))[cut] for cut in parts(list(range(7)), 8)] == [list(range(7))]
