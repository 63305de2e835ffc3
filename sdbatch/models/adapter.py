"""The torch-free values a loaded model hands back: ``GeneratedBatch``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class GeneratedBatch:
    """One batch's images as a (rows, height, width, 3) uint8 host array, and per row either
    None or why its image is unusable (it must then not be stored as a success)."""

    pixels: np.ndarray
    errors: list[str | None]

    def images(self) -> list[Image.Image]:
        from PIL import Image

        return [Image.fromarray(p) for p in self.pixels]
