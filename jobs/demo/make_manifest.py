"""Writes jobs/demo/manifest.parquet: 100 varied prompts for the built-in shapes model.

Run: python jobs/demo/make_manifest.py   (deterministic; the Parquet file is committed)
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = ["small", "large"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]


def rows() -> list[dict]:
    out = []
    for i in range(100):
        colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[(i // 2) % len(SHAPES)]
        size = SIZES[(i // 3) % len(SIZES)]
        place = PLACES[(i // 5) % len(PLACES)]
        background = COLOURS[(i * 3 + 1) % len(COLOURS)]
        if background == colour:
            background = COLOURS[(COLOURS.index(colour) + 4) % len(COLOURS)]
        kind = "gradient background" if i % 7 == 0 else "background"
        out.append(
            {
                "id": f"demo-{i:03d}",
                "prompt": f"a {size} {colour} {shape} {place}, {background} {kind}",
                "negative_prompt": "black" if i % 10 == 5 and colour != "black" and background != "black" else "",
                "seed": 1000 + i,
                "shape": shape,  # passthrough label columns, copied into the metadata
                "colour": colour,
            }
        )
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("manifest.parquet")
    pq.write_table(pa.Table.from_pylist(rows()), path)
    print(f"wrote {path} ({len(rows())} rows)")
