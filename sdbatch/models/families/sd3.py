"""SD3: ``StableDiffusion3Pipeline``, a flow-matching transformer (flow samplers), CLIP text
encoders plus an optional T5, shifted VAE latents, and an img2img that is told the row's size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import DiffusersFamily

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class StableDiffusion3(DiffusersFamily):
    name = "SD3"
    class_name = "StableDiffusion3Pipeline"
    txt2img = "StableDiffusion3Pipeline"
    img2img = "StableDiffusion3Img2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    sdpa_modules = ("vae",)  # the transformer keeps its own joint-attention processors

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        """SD3's img2img renders at its native size unless told the (init image's) row size."""
        return {"height": first.height, "width": first.width}

    def latent_shift(self, vae: Any) -> float:
        return vae.config.shift_factor or 0.0
