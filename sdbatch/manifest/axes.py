"""X/Y grid axes: parsing ``--axis COLUMN=V1,V2`` and expanding rows over them."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pyarrow as pa

from sdbatch.errors import BadInput

GRID_GROUP, GRID_AXES = "grid_group", "grid_axes"
#: Manifest columns an axis may vary.
AXIS_COLUMNS = ("seed", "steps", "guidance_scale", "width", "height", "scheduler", "negative_prompt", "strength")
MAX_AXES = 2


class GridError(BadInput, ValueError):
    """Bad ``--grid`` axes or an OUT without grid rows; the message says what to change."""


def parse_axes(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["seed=1-4 guidance_scale=3,5,7"]`` (or one axis per item) → ``[(column, values)]``."""
    from sdbatch.manifest.values import ManifestBuildError, parse_constant

    axes: list[tuple[str, list[Any]]] = []
    for item in (word for text in items for word in text.split()):
        name, sep, raw = item.partition("=")
        if not sep or name not in AXIS_COLUMNS:
            raise GridError(f"--grid {item!r}: expected COLUMN=VALUES with COLUMN one of {', '.join(AXIS_COLUMNS)}, "
                            "e.g. --grid seed=1-4 --grid guidance_scale=3,5,7")
        values: list[Any] = []
        for value in raw.split(","):
            span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
            if span and name in ("seed", "steps", "width", "height"):
                values.extend(range(int(span[1]), int(span[2]) + 1))
                continue
            try:
                values.append(parse_constant(f"{name}={value}")[1])
            except ManifestBuildError as exc:
                raise GridError(f"--grid {item!r}: {exc}") from None
        if not values or len(set(values)) != len(values):
            raise GridError(f"--grid {item!r}: give each value once (e.g. 1-4 or 3,5,7)")
        if name in (n for n, _ in axes):
            raise GridError(f"--grid {name}: that axis is given twice")
        axes.append((name, values))
    if not 1 <= len(axes) <= MAX_AXES:
        raise GridError(f"--grid: give one or two axes (X and Y), not {len(axes)}")
    return axes


def expand_grid(base: pa.Table, axes: list[tuple[str, list[Any]]], column_types: dict[str, pa.DataType]) -> pa.Table:
    """Every row of ``base`` once per cell (X slowest), with the axis columns and the grid columns."""
    clash = [name for name, _ in axes if name in base.column_names]
    if clash:
        raise GridError(f"--grid {clash[0]}: the prompts already have a {clash[0]!r} column")
    cells = list(itertools.product(*(values for _, values in axes)))
    positions = pa.array([i for i in range(base.num_rows) for _ in cells], pa.int64())
    table = base.take(positions)
    base_ids = base.column("id").to_pylist() if "id" in base.column_names else [f"{i:08d}" for i in range(base.num_rows)]
    ids = [f"{base_ids[i]}-{'-'.join(f'{n}{v}' for (n, _), v in zip(axes, cell))}" for i in range(base.num_rows) for cell in cells]
    if "id" in table.column_names:
        table = table.drop_columns(["id"])
    table = table.add_column(0, "id", pa.array(ids, pa.string()))
    for a, (name, _) in enumerate(axes):
        values = [cell[a] for _ in range(base.num_rows) for cell in cells]
        table = table.append_column(name, pa.array(values, column_types.get(name)))
    table = table.append_column(GRID_GROUP, positions)
    return table.append_column(GRID_AXES, pa.array([",".join(n for n, _ in axes)] * len(ids), pa.string()))
