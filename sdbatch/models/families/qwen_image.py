"""Qwen-Image: ``QwenImagePipeline``, an MMDiT flow-matching transformer conditioned on a
Qwen2.5-VL LLM text encoder, with a 3-D (video-style) VAE whose latents are normalised per channel.

``guidance_scale`` is recorded as Qwen-Image's ``true_cfg_scale``: real classifier-free
guidance against the negative prompt (an empty one is still a negative prompt), on when it is
above 1 (the pipeline's ``guidance_scale`` is for guidance-distilled transformers, which
Qwen-Image is not). The native size is the pipeline's ``default_sample_size`` (128) × the VAE's
factor (2 ** its temporal downsampling levels, as the pipeline computes it); sizes must be
multiples of that factor × the 2×2 patches. The latents come back packed as 2×2-patch tokens
and are unpacked to (batch, channels, 1 frame, h, w) for the VAE. No CLIP encoder: no clip_skip."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdbatch.data.samplers import family_samplers
from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily

if TYPE_CHECKING:
    from sdbatch.data.row import Row

DEFAULT_SAMPLE_SIZE = 128  # QwenImagePipeline.default_sample_size (latent pixels per side)


def qwen_vae_scale(read_json: JsonReader, where: str) -> int:
    """Pixels per latent of ``AutoencoderKLQwenImage``: 2 ** len(temperal_downsample)."""
    levels = (read_json("vae/config.json") or {}).get("temperal_downsample")
    if not isinstance(levels, list):
        raise FamilyError(f"model {where}: vae/config.json needs temperal_downsample to know the VAE's scale; "
                          "is the folder complete?")
    return 2 ** len(levels)


class QwenImage(DiffusersFamily):
    name = "Qwen-Image"
    class_name = "QwenImagePipeline"
    txt2img = "QwenImagePipeline"
    img2img = "QwenImageImg2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    honours = ALL_COLUMNS - {"clip_skip"}
    guidance = "true_cfg"
    text_encoder_counts_layers = False

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        side = DEFAULT_SAMPLE_SIZE * qwen_vae_scale(read_json, where)
        return side, side

    def size_multiple(self, read_json: JsonReader, where: str) -> int:
        return qwen_vae_scale(read_json, where) * 2

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        """Qwen-Image's img2img renders at its native size unless told the row's."""
        return {"height": first.height, "width": first.width}

    def unpack_latents(self, pipe: Any, latents: Any, first: Row) -> Any:
        return pipe._unpack_latents(latents, first.height, first.width, pipe.vae_scale_factor)

    def decode_input(self, vae: Any, latents: Any) -> Any:
        """Undo the per-channel normalisation (``latents_mean``/``latents_std``), as the pipeline does."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = latents.new_tensor(vae.config.latents_mean).view(shape).to(vae.dtype)
        std = latents.new_tensor(vae.config.latents_std).view(shape).to(vae.dtype)
        return latents.to(vae.dtype) * std + mean

    def vae_decode(self, vae: Any, latents: Any) -> Any:
        return vae.decode(self.decode_input(vae, latents), return_dict=False)[0][:, :, 0]  # the one frame
