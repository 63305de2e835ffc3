"""SD 1.x / 2.x: ``StableDiffusionPipeline``, a UNet with one CLIP text encoder; and its
inpainting models (``StableDiffusionInpaintPipeline``)."""

from __future__ import annotations

import numpy as np

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily, ModelTraits, RowRule


class StableDiffusion(DiffusersFamily):
    name = "SD 1.x / 2.x"
    class_name = "StableDiffusionPipeline"
    txt2img = "StableDiffusionPipeline"
    img2img = "StableDiffusionImg2ImgPipeline"
    inpaint = "StableDiffusionInpaintPipeline"
    honours = ALL_COLUMNS  # the hires-fix pass and mask_image too
    denoiser = "unet"
    samplers = family_samplers(flow=False)
    weighted_prompts = "normalized"  # the layer clip_skip picks, final layer norm (as its pipeline)
    # folders may name a safety checker sdbatch never runs (dataset generation; the user's own
    # filter comes after)
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    sdpa_modules = ("unet", "vae")
    channels_last = True
    controlnet = "StableDiffusionControlNetPipeline"
    ip_adapter = True
    takes_embeddings = True


class StableDiffusionInpainting(StableDiffusion):
    """An SD 1.x / 2.x inpainting model (``StableDiffusionInpaintPipeline``: a 9-channel UNet that
    reads the masked image and the mask beside the latents): the same components, so the SD
    pipelines load it; its rows are inpainting rows, and it runs no hires-fix pass (the img2img
    pipeline feeds a UNet 4 channels)."""

    name = "SD 1.x / 2.x inpainting"
    class_name = "StableDiffusionInpaintPipeline"

    def row_rules(self, traits: ModelTraits) -> tuple[RowRule, ...]:
        return (*super().row_rules(traits),
                RowRule("hires_scale", lambda values: ~np.isnan(values.astype(float)) & (values != 0),
                        f"{traits.label} runs no hires-fix pass (its 9-channel UNet takes no img2img pass)",
                        "leave hires_scale null for this model", null_as=np.nan))
