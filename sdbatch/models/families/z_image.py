"""Z-Image and Z-Image-Turbo: ``ZImagePipeline``, a single-stream flow-matching transformer
conditioned on a Qwen3 LLM text encoder, and shifted VAE latents.

``guidance_scale`` is classifier-free guidance with the negative prompt (0 turns the
unconditional branch off, as Z-Image-Turbo is run). The pipeline renders 1024×1024 unless told
otherwise, whatever the folder's configs say, and needs sizes that are multiples of the VAE
factor × the transformer's patch size. There is no CLIP encoder, so no ``clip_skip``. Turbo
folders are told apart by their scheduler config (a fixed shift of 3, no dynamic shifting)."""

from __future__ import annotations

from typing import Any

from sdbatch.data.samplers import family_samplers
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily, vae_scale


class ZImage(DiffusersFamily):
    name = "Z-Image"
    class_name = "ZImagePipeline"
    txt2img = "ZImagePipeline"
    img2img = "ZImageImg2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    honours = ALL_COLUMNS - {"clip_skip"}
    text_encoder_counts_layers = False
    default_size = 1024  # ZImagePipeline.__call__: height = height or 1024

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        return self.default_size, self.default_size

    def size_multiple(self, read_json: JsonReader, where: str) -> int:
        return vae_scale(read_json, where) * 2  # the transformer's 2×2 patches

    def latent_shift(self, vae: Any) -> float:
        return vae.config.shift_factor or 0.0
