"""Tiles a finished job's images into one PNG, in manifest order (the README's contact sheet).

Run: python jobs/demo/contact_sheet.py out/demo docs/demo-contact-sheet.png [--columns 10]
"""

import argparse
import io
import math
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image


def contact_sheet(out: Path, columns: int) -> Image.Image:
    index = [r for r in pq.read_table(out / "index.parquet").to_pylist() if r["status"] == "ok"]
    tiles = [Image.open(io.BytesIO((out / r["key"]).read_bytes())).convert("RGB") for r in index]
    width = max(t.width for t in tiles)
    height = max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (width + 2), rows * (height + 2)), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * (width + 2), (i // columns) * (height + 2)))
    return sheet


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--columns", type=int, default=10)
    args = parser.parse_args()
    args.target.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(args.out, args.columns).save(args.target)
    print(f"wrote {args.target}")
