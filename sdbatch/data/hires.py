"""The hires-fix second pass as AUTOMATIC1111 runs it (its "Hires. fix"): a row rendered at
width×height, its latents upscaled by ``hires_scale`` with A1111's ``Latent`` upscaler (bilinear
interpolation of the latents, no antialiasing), then denoised again by the family's img2img
pipeline at the upscaled size with ``hires_strength`` over ``hires_steps`` (null: the row's
steps). This module owns the size rule both validation and the runtime apply.

A leaf module: the standard library only."""

from __future__ import annotations

#: A1111's name of the upscaler sdbatch's second pass uses (its infotext's ``Hires upscaler``).
HIRES_UPSCALER = "Latent"

#: The upscaled size's grid: whole latent pixels of every SD-family VAE (scale factor 8).
HIRES_MULTIPLE = 8


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's (width, height): the row's size times ``scale``, rounded to whole
    pixels (validation refuses a result off the ``HIRES_MULTIPLE`` grid)."""
    return round(width * scale), round(height * scale)
