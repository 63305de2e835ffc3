"""SDXL: ``StableDiffusionXLPipeline``, two CLIP text encoders, size micro-conditioning, and the
refiner it takes (``model.refiner``: a ``StableDiffusionXLImg2ImgPipeline`` folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class StableDiffusionXL(DiffusersFamily):
    name = "SDXL"
    class_name = "StableDiffusionXLPipeline"
    txt2img = "StableDiffusionXLPipeline"
    img2img = "StableDiffusionXLImg2ImgPipeline"
    inpaint = "StableDiffusionXLInpaintPipeline"
    refiner = "StableDiffusionXLImg2ImgPipeline"
    honours = ALL_COLUMNS  # the hires-fix pass and mask_image too
    denoiser = "unet"
    samplers = family_samplers(flow=False)
    weighted_prompts = "penultimate"  # both encoders' penultimate layer (or clip_skip deeper), no norm
    takes_embeddings = True  # A1111's SDXL embedding files: clip_l and clip_g tensors
    sdpa_modules = ("unet", "vae")
    channels_last = True
    controlnet = "StableDiffusionXLControlNetPipeline"
    ip_adapter = True

    def size_conditioning(self, row: Row) -> dict[str, tuple[int, ...]]:
        """The row's own size, uncropped."""
        size = (row.height, row.width)
        return {"original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}
