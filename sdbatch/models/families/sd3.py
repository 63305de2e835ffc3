"""SD3: ``StableDiffusion3Pipeline``, a flow-matching transformer (flow samplers), CLIP text
encoders plus an optional T5, shifted VAE latents, and an img2img that is told the row's size."""

from __future__ import annotations

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import DiffusersFamily


class StableDiffusion3(DiffusersFamily):
    name = "SD3"
    class_name = "StableDiffusion3Pipeline"
    txt2img = "StableDiffusion3Pipeline"
    img2img = "StableDiffusion3Img2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    sdpa_modules = ("vae",)  # the transformer keeps its own joint-attention processors
    img2img_size = True

