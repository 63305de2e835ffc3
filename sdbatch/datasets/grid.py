"""Drawing X/Y grids, as AUTOMATIC1111's X/Y/Z plot: ``sdbatch manifest --grid seed=1-4 --grid
guidance_scale=3,5,7`` repeats every prompt for each cell of the axes, and after the job
``sdbatch grid OUT -o DIR`` draws one labelled image per prompt (columns: X values; rows: Y). A cell whose stored image is not the
bytes its index row recorded is drawn marked "not the indexed image" and named in a warning.

A grid manifest records itself in two passthrough columns: ``grid_group`` (the prompt's number)
and ``grid_axes`` (``"seed,guidance_scale"``); the cell values are the rows' own columns. Parsing and expanding the axes is
``manifest.axes``'.
No torch here."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.manifest.axes import GRID_AXES, GRID_GROUP, GridError

if TYPE_CHECKING:
    from sdbatch.output.index import JobIndex
    from sdbatch.output.layout import Layout

log = logging.getLogger("sdbatch.grid")


CELL_MIN_PIXELS = 128  # small images are scaled up (nearest) so labels stay readable
LABEL_HEIGHT = 18


def _cell(image: Any, size: tuple[int, int]) -> Any:
    from PIL import Image

    return image.convert("RGB").resize(size, Image.Resampling.NEAREST)


def render_grids(index: JobIndex, layout: Layout, dest: Path) -> list[Path]:
    """One labelled PNG per grid prompt under ``dest`` (``grid-<group>.png``); returns their
    paths. The index is read a record batch at a time: a prompt's cells are consecutive rows
    (``manifest.axes.expand_grid``), so one prompt's rows are held at a time."""
    if GRID_GROUP not in index.column_names:
        raise GridError(f"{layout.storage.url} holds no grid rows (no {GRID_GROUP} column); build the manifest with "
                        "`sdbatch manifest --grid ...`")
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    group, pending = -1, list[pa.Table]()  # the prompt being gathered, its rows so far
    for batch in index.batches():
        rows = pa.Table.from_batches([batch]).filter(pc.is_valid(batch.column(GRID_GROUP)))
        groups = rows.column(GRID_GROUP).to_numpy()
        edges = (np.flatnonzero(np.diff(groups)) + 1).tolist()  # where another prompt starts
        for start, stop in zip([0, *edges], [*edges, len(groups)]) if len(groups) else ():
            if int(groups[start]) != group and pending:
                written.append(_draw(group, pa.concat_tables(pending), layout, dest))
                pending = []
            group = int(groups[start])
            pending.append(rows.slice(start, stop - start))
    if pending:
        written.append(_draw(group, pa.concat_tables(pending), layout, dest))
    return written


def _draw(group: int, group_rows: pa.Table, layout: Layout, dest: Path) -> Path:
    """The grid image of one prompt's rows."""
    from PIL import Image, ImageDraw, ImageFont

    from sdbatch.datasets.export import iter_images, name_rows

    font = ImageFont.load_default()
    images, mismatched = {}, []
    for entry, data, problem in iter_images(layout, group_rows):
        images[entry["row"]] = data
        if problem:
            mismatched.append((entry["id"], entry["key"], problem))
    cells = group_rows.to_pylist()
    axes = cells[0][GRID_AXES].split(",")
    xs = list(dict.fromkeys(c[axes[0]] for c in cells))
    ys = list(dict.fromkeys(c[axes[1]] for c in cells)) if len(axes) > 1 else [None]
    scale = max(1, -(-CELL_MIN_PIXELS // max(cells[0]["width"], cells[0]["height"])))
    cw, ch = cells[0]["width"] * scale, cells[0]["height"] * scale
    left = 8 + max((int(font.getlength(f"{axes[1]}={y}")) for y in ys), default=0) if len(axes) > 1 else 0
    top = 2 * LABEL_HEIGHT
    sheet = Image.new("RGB", (left + cw * len(xs), top + ch * len(ys)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), cells[0]["prompt"], fill="black", font=font)
    for i, x in enumerate(xs):
        draw.text((left + i * cw + 4, LABEL_HEIGHT + 2), f"{axes[0]}={x}", fill="black", font=font)
    for j, y in enumerate(ys):
        if y is not None:
            draw.text((4, top + j * ch + ch // 2), f"{axes[1]}={y}", fill="black", font=font)
    for c in cells:
        at = (left + xs.index(c[axes[0]]) * cw, top + ys.index(c[axes[1]] if len(axes) > 1 else None) * ch)
        if c["row"] in images:
            sheet.paste(_cell(Image.open(io.BytesIO(images[c["row"]])), (cw, ch)), at)
            if c["id"] in {rid for rid, _, _ in mismatched}:
                draw.text((at[0] + 4, at[1] + 4), "not the indexed image", fill="red", font=font)
        else:
            draw.rectangle([at, (at[0] + cw - 1, at[1] + ch - 1)], fill="lightgrey")
            draw.text((at[0] + 4, at[1] + 4), "failed", fill="red", font=font)
    path = dest / f"grid-{group:05d}.png"
    sheet.save(path)
    if mismatched:  # drawn, but said: what the grid shows is not what the job recorded
        log.warning("%s: %d cells show images that are not the bytes their index rows recorded: %s",
                    path, len(mismatched), name_rows(mismatched))
    return path
