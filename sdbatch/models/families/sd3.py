"""SD3 and SD3.5: ``StableDiffusion3Pipeline``, a flow-matching transformer (flow samplers), CLIP
text encoders plus an optional T5, shifted VAE latents, and an img2img that is told the row's size.

SD3.5 folders are the same pipeline class; their transformers differ only in config (Large:
``qk_norm``; Medium, MMDiT-X: ``qk_norm`` and ``dual_attention_layers``), which
``SD3Transformer2DModel`` builds from the folder's config, so they load here unchanged. Sizes
must be multiples of the VAE factor × the transformer's patch size, as the pipeline checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdbatch.data.samplers import family_samplers
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import DiffusersFamily, vae_scale

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class StableDiffusion3(DiffusersFamily):
    name = "SD3 / SD3.5"
    class_name = "StableDiffusion3Pipeline"
    txt2img = "StableDiffusion3Pipeline"
    img2img = "StableDiffusion3Img2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    sdpa_modules = ("vae",)  # the transformer keeps its own joint-attention processors

    def size_multiple(self, read_json: JsonReader, where: str) -> int:
        patch = (read_json("transformer/config.json") or {}).get("patch_size") or 2  # the pipeline's fallback
        return vae_scale(read_json, where) * int(patch)

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        """SD3's img2img renders at its native size unless told the (init image's) row size."""
        return {"height": first.height, "width": first.width}

    def latent_shift(self, vae: Any) -> float:
        return vae.config.shift_factor or 0.0
