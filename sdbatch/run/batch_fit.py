"""Batch size from memory: the largest batch of each batch key that fits the device, measured
once per key at warm-up, with the spec's ``resources.batch_size`` as the ceiling.

A canonical batch (design.md §4.2) larger than what fits is generated as consecutive parts of
that size, each recorded as its own batch (``batch_rows``), exactly as the out-of-memory
halving (which stays, as the guard) records its halves. Ray-free and torch-free: the probe
— generate these rows for one step, return the device's peak bytes or None when they did not
fit — is handed in (``models.runtime.DiffusersModel.memory_probe`` on CUDA; tests inject one).

How a key is sized: the ceiling is tried first (a fitting ceiling costs one probe, the
warm-up a compiled model runs anyway); when it does not fit, one row and two rows are
probed, giving the fixed cost (weights, activations that do not grow with rows) and the cost
per row, and the largest size within ``headroom`` of the device's capacity is tried, halving
until one fits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from sdbatch.data.record import NO_CONDITIONING, ConditioningInputs

log = logging.getLogger("sdbatch.worker")

#: a probe: rows (and their conditioning images) → the device's peak bytes while generating them
#: for one step, or None when they ran out of memory
Probe = Callable[[list[Any], ConditioningInputs], int | None]

#: the part of the device's capacity a batch may plan to use (the rest: fragmentation, the
#: decoder's peak, what other processes hold)
HEADROOM = 0.9


class BatchFit:
    """The largest batch per batch key that fits, at most ``ceiling``."""

    def __init__(self, ceiling: int, probe: Probe, capacity_bytes: int, headroom: float = HEADROOM):
        self.ceiling = ceiling
        self.probe = probe
        self.budget = int(capacity_bytes * headroom)
        self.sizes: dict[Hashable, int] = {}

    def size_for(self, rows: list[Any], conditioning: ConditioningInputs = NO_CONDITIONING) -> int:
        """The batch size for the batch key of ``rows`` (measured with their first rows)."""
        key = rows[0].batch_key()
        if key not in self.sizes:
            self.sizes[key] = self._measure(rows, conditioning)
            log.info("batch size %d for %dx%d, %d steps (ceiling %d)", self.sizes[key], rows[0].width, rows[0].height,
                     rows[0].steps, self.ceiling)
        return self.sizes[key]

    def _measure(self, rows: list[Any], conditioning: ConditioningInputs) -> int:
        def fits(n: int) -> int | None:
            # the probe takes real rows: the first row repeated when the batch has fewer
            sample = [i % len(rows) for i in range(n)]
            return self.probe([rows[i] for i in sample], conditioning.pick(sample))

        if self.ceiling == 1 or fits(self.ceiling) is not None:
            return self.ceiling
        one = fits(1)
        if one is None:
            return 1  # not even one row fits: the generation itself will say so
        two = fits(2)
        if two is None:
            return 1
        per_row = max(two - one, 1)
        size = max(1, min(self.ceiling - 1, (self.budget - (one - per_row)) // per_row))
        while size > 2 and fits(size) is None:
            size = max(2, size // 2)
        return size


def parts(rows: list[Any], size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``rows``."""
    return [slice(start, start + size) for start in range(0, len(rows), size)]
