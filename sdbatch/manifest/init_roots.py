"""Where a manifest's ``init_image`` values may point: the roots a job allows, checked before any
worker starts, and whether a local one is a readable file (``unreadable_init_image``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sdbatch.data.columns import COLUMN, IMAGE_COLUMNS
from sdbatch.data.row import default_row_id
from sdbatch.manifest.reader import column_pylist, iter_row_batches, resolve_init_image
from sdbatch.manifest.sources import Manifest, ManifestError
from sdbatch.spec import JobSpec
from sdbatch.storage.locations import is_remote, is_s3, local_path, s3_bucket


@dataclass(frozen=True)
class InitImagePlaces:
    """Where a job reads init images from: local folders (symlinks resolved) and ``s3://`` prefixes."""

    local: tuple[str, ...]
    s3: tuple[str, ...]

    def resolve(self, where: str) -> tuple[str, bool]:
        """A resolved ``init_image`` location as it is read (local: symlinks resolved) and
        whether it lies in one of the places."""
        if is_s3(where):
            return where, any(where.startswith(r) for r in self.s3)
        where = os.path.realpath(local_path(where))
        return where, any(where == r or where.startswith(r.rstrip(os.sep) + os.sep) for r in self.local)

    def __str__(self) -> str:
        return ", ".join([*self.local, *self.s3])


def init_image_places(base_dir: str | None, spec: JobSpec, job_locations: list[str]) -> InitImagePlaces:
    """Where the job already reads and writes: the manifest's folder (``base_dir``), the buckets
    of ``job_locations`` (its output, model, manifest), plus what ``limits.init_image_roots`` adds."""
    roots = [*([base_dir] if base_dir else []), *spec.limits.init_image_roots]
    s3_roots = [f"s3://{s3_bucket(loc)}/" for loc in job_locations if is_s3(loc)]
    return InitImagePlaces(
        local=tuple(os.path.realpath(os.path.expanduser(local_path(r))) for r in roots if not is_remote(r)),
        s3=tuple(s3_roots + [r.rstrip("/") + "/" for r in spec.limits.init_image_roots if is_s3(r)]),
    )


def unreadable_init_image(value: str, base_dir: str) -> tuple[str, str] | None:
    """Why a local ``init_image`` cannot be read as it stands now — its path and "does not
    exist", "is not a regular file" or "is not readable" — or None (readable, or remote: an
    ``s3://`` image is checked when it is read)."""
    where = resolve_init_image(value, base_dir)
    if is_remote(where) and not where.startswith("file://"):
        return None
    path = local_path(where)
    if not os.path.exists(path):
        return path, "does not exist"
    if not os.path.isfile(path):
        return path, "is not a regular file"
    if not os.access(path, os.R_OK):
        return path, "is not readable"
    return None


def check_init_image_roots(manifest: Manifest, spec: JobSpec, job_locations: list[str], shown: int = 20) -> None:
    """Init images (and every conditioning image: ``columns.IMAGE_COLUMNS``) are read only from
    the job's ``init_image_places`` (``job_locations``: its output and model; the manifest is
    added here). ManifestError naming each row outside (symlinks resolved)."""
    image_columns = [c for c in IMAGE_COLUMNS if c in manifest.columns]
    if not image_columns:
        return
    places = init_image_places(manifest.base_dir, spec, [*job_locations, manifest.source])
    columns = image_columns + (["id"] if "id" in manifest.columns else [])
    problems: list[str] = []
    row = 0
    for rb in iter_row_batches(manifest, columns=columns):
        ids = (column_pylist(rb.column("id"), "id", row) if "id" in columns
               else [default_row_id(row + i) for i in range(rb.num_rows)])
        for column in image_columns:
            for i, value in enumerate(column_pylist(rb.column(column), column, row)):
                for part in COLUMN[column].image_locations(value):
                    where, inside = places.resolve(resolve_init_image(part, manifest.base_dir))
                    if not inside and len(problems) < shown:
                        problems.append(f"  row {row + i} (id {ids[i]}): {column} {part!r} resolves to {where}")
        row += rb.num_rows
    if problems:
        raise ManifestError(
            f"init or control images outside the places this job reads from ({places}):\n"
            + "\n".join(problems) + "\nMove them under the manifest's folder, or allow their folder or bucket "
            "explicitly with --set 'limits.init_image_roots=[\"/path/or/s3://bucket/prefix\"]'; nothing was written"
        )
