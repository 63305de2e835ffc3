"""Manifest reading and validation, and the ``Row`` value type.

A ``Row`` is one manifest row with every job default already applied. It flows from the
manifest reader through planning and batching to the generator and into the metadata
record, so it holds only plain, serialisable values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    index: int  # 0-based position in the manifest (across all its files)
    id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    init_image: str | None = None  # resolved location: absolute local path or s3:// URI
    strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough columns, untouched

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def batch_key(self) -> tuple:
        """Everything that must be equal for rows to share one GPU batch (DESIGN §3)."""
        return (
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.guidance_scale,
            self.is_img2img,
            self.strength,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
