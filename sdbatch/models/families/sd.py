"""SD 1.x / 2.x: ``StableDiffusionPipeline``, a UNet with one CLIP text encoder."""

from __future__ import annotations

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import DiffusersFamily


class StableDiffusion(DiffusersFamily):
    name = "SD 1.x / 2.x"
    class_name = "StableDiffusionPipeline"
    txt2img = "StableDiffusionPipeline"
    img2img = "StableDiffusionImg2ImgPipeline"
    denoiser = "unet"
    samplers = family_samplers(flow=False)
    # folders may name a safety checker sdbatch never runs (dataset generation; the user's own
    # filter comes after)
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    sdpa_modules = ("unet", "vae")
    channels_last = True
    controlnet = "StableDiffusionControlNetPipeline"
    takes_embeddings = True
