"""SD3 and SD3.5: ``StableDiffusion3Pipeline``, a flow-matching transformer (flow samplers), CLIP
text encoders plus an optional T5, shifted VAE latents, and an img2img that is told the row's size.

SD3.5 folders are the same pipeline class; their transformers differ only in config (Large:
``qk_norm``; Medium, MMDiT-X: ``qk_norm`` and ``dual_attention_layers``), which
``SD3Transformer2DModel`` builds from the folder's config, so they load here unchanged."""

from __future__ import annotations

from sdbatch.data.samplers import family_samplers
from sdbatch.models.families.base import DiffusersFamily


class StableDiffusion3(DiffusersFamily):
    name = "SD3 / SD3.5"
    class_name = "StableDiffusion3Pipeline"
    txt2img = "StableDiffusion3Pipeline"
    img2img = "StableDiffusion3Img2ImgPipeline"
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    weighted_prompts = "penultimate"  # the CLIP pair as SDXL's, before the T5 tokens
    sdpa_modules = ("vae",)  # the transformer keeps its own joint-attention processors
    img2img_size = True
    # its ControlNets (InstantX's, Stability's SD3.5) read the control image's VAE latents through
    # their own patch embedding; their blocks' residuals are added to the transformer's
    controlnet = "StableDiffusion3ControlNetPipeline"
    controlnet_model = "SD3ControlNetModel"
    controlnet_image = ("control_image", "per_controlnet")
    controlnet_fit = ("in_channels", "patch_size", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                      "caption_projection_dim", "pooled_projection_dim")
