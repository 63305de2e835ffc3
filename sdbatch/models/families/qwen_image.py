"""Qwen-Image: ``QwenImagePipeline``, an MMDiT flow-matching transformer conditioned on a
Qwen2.5-VL LLM text encoder, with a 3-D (video-style) VAE whose latents are normalised per channel.

``guidance_scale`` is recorded as Qwen-Image's ``true_cfg_scale``: real classifier-free
guidance against the negative prompt (an empty one is still a negative prompt), on above 1 (the
pipeline's ``guidance_scale`` is for guidance-distilled transformers, which Qwen-Image is not);
its defaults are the pipeline's 50 steps and 4. The native size is the pipeline's
``default_sample_size`` (128) × the VAE's factor (2 ** its temporal downsampling levels, as the
pipeline computes it); sizes are multiples of that factor × the 2×2 patches. The latents come
back packed as 2×2-patch tokens and are unpacked to (batch, channels, 1 frame, h, w) for the
VAE. The prompt sits in a system-prompt template whose first 34 tokens are dropped after
encoding; 512 tokens are read. No CLIP encoder: no clip_skip.

Qwen-Image-Edit (``QwenImageEdit``): the same model as an instruction-edit model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdbatch.models.configs import JsonReader
from sdbatch.models.errors import FamilyError
from sdbatch.models.families.base import COMMON_COLUMNS, DiffusersFamily, Guidance, ModelTraits
from sdbatch.models.families.chat import LLM_MAX_SEQUENCE_LENGTH, MU_SAMPLERS, prompt_budget

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class QwenImage(DiffusersFamily):
    name = "Qwen-Image"
    class_name = "QwenImagePipeline"
    txt2img = "QwenImagePipeline"
    img2img = "QwenImageImg2ImgPipeline"
    denoiser = "transformer"
    samplers = MU_SAMPLERS
    guidance = "true_cfg"
    text_encoder_counts_layers = False
    takes_clip_skip = False
    default_sample_size = 128
    img2img_size = True

    def vae_scale_factor(self, read_json: JsonReader, where: str) -> int:
        """``AutoencoderKLQwenImage``'s: 2 ** len(temperal_downsample)."""
        levels = (read_json("vae/config.json") or {}).get("temperal_downsample")
        if not isinstance(levels, list):
            raise FamilyError(f"model {where}: vae/config.json needs temperal_downsample to know the native size; "
                              "is the folder complete?")
        return 2 ** len(levels)

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        return {"steps": 50, "guidance_scale": 4.0}  # QwenImagePipeline.__call__'s

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return LLM_MAX_SEQUENCE_LENGTH

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        assert traits.max_sequence_length is not None
        return [prompt_budget(pipe.tokenizer, traits.max_sequence_length, pipe.prompt_template_encode.format,
                              dropped=pipe.prompt_template_encode_start_idx)]

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


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit: ``QwenImageEditPipeline``, Qwen-Image's transformer attending to the source
    image's latent tokens beside the target's, its Qwen2.5-VL encoder reading the source image
    with the instruction. Every row edits its ``init_image`` (``edits``, as FLUX.1 Kontext; no
    strength); guidance is Qwen-Image's ``true_cfg`` against the negative prompt. The pipeline
    scales the source (already covering the row's size, centre-cropped) to about 1024² at its
    aspect for both encoders, whatever the output size, which it is told: the row's. Its
    processor (``processor/``, a ``Qwen2VLProcessor``) is built without the video processor
    that needs torchvision (``models.qwen_processor``). The instruction is read whole: the
    pipeline's processor cuts no prompt, so no ``max_sequence_length`` is passed or recorded."""

    name = "Qwen-Image-Edit"
    class_name = "QwenImageEditPipeline"
    txt2img = "QwenImageEditPipeline"
    img2img = "QwenImageEditPipeline"
    edits = True
    honours = COMMON_COLUMNS - {"strength"}
    component_classes = {"processor": "ImageQwen2VLProcessor"}  # not transformers' (torchvision)

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return None

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        return []

    def img2img_kwargs(self, first: Row) -> dict[str, Any]:
        return {"height": first.height, "width": first.width}
