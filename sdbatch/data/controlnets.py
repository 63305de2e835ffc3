"""Per-row ControlNets, torch-free: the ``controlnet`` column (``NAME:SCALE,…``, in the order the
row's control images follow) and the ``control_image`` column (one image for every ControlNet
the row names, or one per ControlNet separated by ``|``); parsing only (the ControlNet folders'
checks are ``models.resolve``'s).

A row's ControlNet set is part of its batch key as the canonical text ``format_set`` writes (the
order is kept: the n-th control image conditions the n-th ControlNet). The job declares its
ControlNets (``controlnets: {NAME: PATH}``), as it declares LoRAs."""

from __future__ import annotations

import math
import re

from sdbatch.errors import BadInput

#: What separates one control image from the next in a ``control_image`` value.
IMAGE_SEPARATOR = "|"


ControlNetSet = tuple[tuple[str, float], ...]


#: One entry: a name as LoRAs are named (it is also a spec key, ``controlnets.NAME``), an optional scale.
_ENTRY_RE = re.compile(r"^\s*([A-Za-z0-9_-]{1,64})\s*(?::\s*(.*?))?\s*$")


class ControlNetError(BadInput, ValueError):
    """A malformed ControlNet reference; the message says what is wrong and how to write it."""


def _scaled(text: str) -> tuple[str, float]:
    match = _ENTRY_RE.match(text)
    if match is None:
        raise ControlNetError(f"controlnet entry {text!r}: write NAME or NAME:SCALE, a name of letters, digits, '_' and '-' (1-64 characters)")
    name, scale_text = match.group(1), match.group(2)
    try:
        scale = 1.0 if scale_text is None else float(scale_text)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale):
        raise ControlNetError(f"controlnet entry {text!r}: the scale {scale_text!r} is not a finite number (write NAME:0.8)")
    return name, scale


def parse_column(value: str | None) -> ControlNetSet:
    """``"NAME:SCALE[,NAME:SCALE…]"`` (scale default 1.0; null or empty = none), in order; a
    ControlNet named twice is refused (give it once, with one image)."""
    if value is None or not value.strip():
        return ()
    entries = tuple(_scaled(part) for part in value.split(","))
    names = [name for name, _ in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ControlNetError(f"controlnet {value!r}: {', '.join(twice)} named twice; name each ControlNet once")
    return entries


def format_set(controlnets: ControlNetSet) -> str:
    """The canonical ``controlnet`` text of a set (what a Row holds and records)."""
    return ",".join(f"{name}:{scale:g}" for name, scale in controlnets)


def canonical(value: str) -> str:
    """A ``controlnet`` value in its canonical spelling; a malformed one as it is (validation
    reports it)."""
    try:
        return format_set(parse_column(value))
    except ControlNetError:
        return value


def split_images(value: str | None) -> list[str]:
    """The control images a ``control_image`` value names, in order."""
    return [] if value is None else [part.strip() for part in value.split(IMAGE_SEPARATOR)]


def row_controlnets(column: str | None, images: str | None, declared: dict[str, str]) -> tuple[ControlNetSet, list[str]]:
    """A row's ControlNets and one control image for each: ControlNetError for a malformed
    entry, a name the job does not declare, a ControlNet without a control image, or a count of
    images that is neither one nor one per ControlNet."""
    controlnets = parse_column(column)
    paths = split_images(images)
    unknown = [name for name, _ in controlnets if name not in declared]
    if unknown:
        known = ", ".join(sorted(declared)) or "none declared"
        raise ControlNetError(
            f"ControlNet(s) {', '.join(unknown)} not declared for this job (declared: {known}); "
            "declare it in the spec: controlnets: {NAME: FOLDER} (or --set controlnets.NAME=FOLDER)"
        )
    if controlnets and not paths:
        raise ControlNetError(f"controlnet {format_set(controlnets)!r} needs a control_image in the same row")
    if any(not p for p in paths):
        raise ControlNetError(f"control_image {images!r}: an empty path between '{IMAGE_SEPARATOR}' separators")
    if controlnets and len(paths) not in (1, len(controlnets)):
        raise ControlNetError(
            f"control_image names {len(paths)} images for {len(controlnets)} ControlNets; give one "
            f"image for all, or one per ControlNet in the controlnet column's order, separated by "
            f"'{IMAGE_SEPARATOR}'"
        )
    return controlnets, paths * len(controlnets) if len(paths) == 1 else paths
