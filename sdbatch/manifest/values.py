"""Parsing the manifest builder's plain values: seed lists and ranges, constant columns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from sdbatch.data.columns import arrow_types
from sdbatch.data.row import MAX_SEED
from sdbatch.errors import BadInput

COLUMN_TYPES: dict[str, pa.DataType] = arrow_types()

ASSIGNMENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


class ManifestBuildError(BadInput, ValueError):
    """Bad input to ``sdbatch manifest``; the message says what to change."""


def parse_seeds(text: str) -> list[tuple[int, int]]:
    """``0-99`` / ``1,5,9`` / ``0-9,100`` → half-open ranges ``[(0, 100)]`` etc., in order."""
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", item)
        if not m:
            raise ManifestBuildError(f"--seeds {text!r}: {item!r} is not a seed or a range; use e.g. 0-99 or 1,5,9")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ManifestBuildError(f"--seeds {text!r}: range {item!r} ends before it starts")
        if hi >= MAX_SEED:
            raise ManifestBuildError(f"--seeds {text!r}: seeds must be below 2**63")
        ranges.append((lo, hi + 1))
    ordered = sorted(ranges)
    for (_, a1), (b0, _) in zip(ordered, ordered[1:]):
        if b0 < a1:
            raise ManifestBuildError(f"--seeds {text!r}: seed {b0} is listed twice (ids would repeat)")
    return ranges


def seed_count(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


def seeds_at(ranges: Sequence[tuple[int, int]], positions: np.ndarray) -> np.ndarray:
    lengths = np.array([b - a for a, b in ranges], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(lengths)])
    which = np.searchsorted(cum, positions, side="right") - 1
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    return starts[which] + (positions - cum[which])


def parse_constant(item: str) -> tuple[str, Any]:
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ManifestBuildError(f"--column {item!r}: expected NAME=VALUE, e.g. --column steps=30")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) or value is None:
        value = raw
    want = COLUMN_TYPES.get(name)
    if name in ("id", "prompt"):
        raise ManifestBuildError(f"--column {item!r}: {name} cannot be a constant")
    if want is not None:
        try:
            if pa.types.is_integer(want):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError
            elif pa.types.is_floating(want):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError
                value = float(value)
            else:
                value = str(raw.strip()) if not isinstance(value, str) else value
        except TypeError:
            kind = "an integer" if pa.types.is_integer(want) else "a number"
            raise ManifestBuildError(f"--column {item!r}: {name} must be {kind}") from None
    return name, value
