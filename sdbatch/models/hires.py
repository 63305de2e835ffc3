"""The hires-fix second pass (``data.hires``: AUTOMATIC1111's "Hires. fix") on a batch's latents:
upscaled with A1111's ``Latent`` upscaler — bilinear interpolation, no antialiasing — to the
row size × ``hires_scale``, then denoised again by the family's img2img pipeline (made with
``from_pipe``: the same modules, no second copy of the weights), which takes 4-channel latents as
its ``image``, at ``hires_strength`` over ``hires_steps`` (null: the row's steps) with generators
seeded from each row's seed again. Worker only: imports torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from sdbatch.data.hires import hires_size
from sdbatch.data.row import Row


def hires_rows(rows: list[Row]) -> list[Row]:
    """The rows as the second pass renders them: at the upscaled size, with its steps (the size
    also gives SDXL's size conditioning of that pass)."""
    first = rows[0]
    width, height = hires_size(first.width, first.height, first.hires_scale)
    return [replace(r, width=width, height=height, steps=r.hires_steps or r.steps) for r in rows]


def hires_pass(pipe: Any, latents: torch.Tensor, rows: list[Row], call_kwargs: Callable[[list[Row]], dict[str, Any]]) -> torch.Tensor:
    """The second pass over ``latents`` (a canonical batch's, as its first pass left them) with
    the img2img ``pipe``; ``call_kwargs(rows)`` gives the pipeline arguments of rows (prompts,
    guidance, steps, fresh per-row generators, latent output)."""
    second = hires_rows(rows)
    factor = pipe.vae_scale_factor
    size = (second[0].height // factor, second[0].width // factor)
    upscaled = torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)
    return pipe(image=upscaled, strength=rows[0].hires_strength, **call_kwargs(second)).images
