"""``Row``: one manifest row with every job default applied, built from the column table; row ids
and derived seeds (design.md §3.3)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import field, make_dataclass
from typing import TYPE_CHECKING, Any

from sdbatch.data.columns import BATCH_KEY, COLUMN, COLUMNS, IMAGE_COLUMNS, Column


class _RowBehaviour:
    # fields of the class the column table makes, declared for mypy (a base that is not a
    # dataclass adds no fields)
    index: int
    id: str
    init_image: str | None
    mask_image: str | None
    control_image: str | None

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def is_inpaint(self) -> bool:
        """An inpainting row: its init image repainted where its mask is white."""
        return self.mask_image is not None

    def images(self) -> dict[str, list[str]]:
        """The row's conditioning images (``columns.IMAGE_COLUMNS`` it sets): column → the
        locations it names, in order (control_image: one per ControlNet, or one for all)."""
        return {name: COLUMN[name].image_locations(getattr(self, name))
                for name in IMAGE_COLUMNS if getattr(self, name) is not None}

    def batch_key(self) -> tuple:
        """Everything that must be equal for rows to share one GPU batch (design.md §4.2)."""
        return (*(getattr(self, name) for name in BATCH_KEY), self.is_img2img, self.is_inpaint)

    def parameters(self) -> dict[str, Any]:
        """The row's identity and generation parameters, as the index and image records hold them."""
        return {"id": self.id, "row": self.index,
                **{c.name: c.stored(getattr(self, c.name)) for c in COLUMNS if c.name != "id"}}


def _row_field(column: Column) -> tuple:
    if column.row is not None:
        return column.name, column.row.type, field(default=column.row.default)
    if column.nullable:
        return column.name, column.python_type | None, field(default=None)
    if column.recorded_when_set:
        return column.name, column.python_type, field(default=column.default)
    return column.name, column.python_type


#: One manifest row with every job default applied: ``index`` (0-based position in the
#: manifest, across all its files), one field per column of the column table (``init_image``
#: is the resolved location: an absolute local path or an s3:// URI; ``strength`` is set for
#: img2img rows only, ``refiner_switch`` in jobs with a refiner only), and ``extra``, the passthrough columns, untouched.
if TYPE_CHECKING:  # the class is made at run time from the column table: to mypy a row is Any
    Row = Any
else:
    Row = make_dataclass(
        "Row",
        [("index", int), *sorted((_row_field(c) for c in COLUMNS), key=lambda f: len(f) == 3),  # defaulted fields last
         ("extra", dict, field(default_factory=dict))],
        bases=(_RowBehaviour,),
        frozen=True,
    )
    Row.__module__ = __name__


ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"


_ID_RE = re.compile(rf"^{ID_PATTERN}$")


MAX_SEED = 2**63  # seeds are 0 <= seed < MAX_SEED (they fit int64 and torch.manual_seed)


def derive_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row that has none: a stable hash of the job seed and the row id.

    ``int.from_bytes(sha256(f"{job_seed}:{row_id}".encode("utf-8")).digest()[:8], "big") & (2**63 - 1)``

    It depends on nothing else — not the row's position, file, shard or batch — so
    reordering, filtering or re-sharding a manifest leaves every row's seed unchanged.
    """
    digest = hashlib.sha256(f"{job_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (MAX_SEED - 1)


def default_row_id(index: int) -> str:
    """The id of a row in a manifest without an ``id`` column: its 0-based index, zero-padded."""
    return f"{index:08d}"
