"""FLUX.1 ([dev] and [schnell]): ``FluxPipeline``, a flow-matching transformer over 2×2-packed
latent tokens, a CLIP encoder for the pooled embedding and a T5 encoder for the token sequence.

Neither variant has an unconditional branch (no negative prompt, no clip_skip). The variant is
read from the transformer's config: [dev] embeds its distilled guidance (``guidance_embeds``),
so ``guidance_scale`` is that embedding (the pipeline's defaults: 28 steps, 3.5) and the T5
reads 512 tokens; [schnell] is guidance-free (4 steps, guidance unused, 256 T5 tokens, as
Black Forest Labs run it). The native size is the pipeline's ``default_sample_size`` (128)
× the VAE's factor; sizes are multiples of twice the VAE factor (the 2×2 packing). The
pipeline's own scheduler computes a resolution-dependent shift (``mu``), which only
``FlowMatchEulerDiscreteScheduler`` takes, so ``default`` and ``flow_euler`` are its samplers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sdbatch.data.samplers import DEFAULT_SAMPLER
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import DiffusersFamily, Guidance, ModelTraits

if TYPE_CHECKING:
    from sdbatch.data.row import Row


class PackedTransformerFamily(DiffusersFamily):
    """What the FLUX.1 architecture's pipelines share (FLUX.1, Chroma): a transformer over
    2×2-packed latent tokens, the pipeline's fixed ``default_sample_size`` of 128, an img2img
    told the row size, a T5 prompt encoder whose ``max_sequence_length`` is passed, no clip_skip,
    and the resolution-shifted Euler flow sampler."""

    denoiser = "transformer"
    samplers = (DEFAULT_SAMPLER, "flow_euler")
    sdpa_modules = ("vae",)  # the transformer runs its own attention processors (SDPA already)
    text_encoder_counts_layers = False
    takes_clip_skip = False
    default_sample_size = 128
    packing = 2
    img2img_size = True
    t5_tokenizer: ClassVar[str] = "tokenizer"  # the pipeline attribute of the T5's tokenizer

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        """The T5's: its tokens are the sequence the transformer attends to (a CLIP, where
        there is one, gives only a pooled vector)."""
        assert traits.max_sequence_length is not None
        return [(getattr(pipe, self.t5_tokenizer), traits.max_sequence_length)]

    def unpack_latents(self, pipe: Any, latents: Any, first: Row) -> Any:
        return pipe._unpack_latents(latents, first.height, first.width, pipe.vae_scale_factor)


class Flux(PackedTransformerFamily):
    name = "FLUX.1"
    class_name = "FluxPipeline"
    txt2img = "FluxPipeline"
    img2img = "FluxImg2ImgPipeline"
    guidance = "distilled"
    t5_tokenizer = "tokenizer_2"
    # its ControlNets (InstantX's, Shakker's union) read the control image's VAE latents, packed as
    # the transformer's; their blocks' residuals are added to the transformer's hidden states
    controlnet = "FluxControlNetPipeline"
    controlnet_model = "FluxControlNetModel"
    controlnet_image = ("control_image", "per_controlnet")
    controlnet_fit = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                      "pooled_projection_dim", "axes_dims_rope")

    def _guidance_embedded(self, read_json: JsonReader) -> bool:
        return bool((read_json("transformer/config.json") or {}).get("guidance_embeds"))

    def variant(self, read_json: JsonReader) -> str | None:
        return "dev" if self._guidance_embedded(read_json) else "schnell"

    def model_guidance(self, read_json: JsonReader) -> Guidance:
        return "distilled" if self._guidance_embedded(read_json) else "none"

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        return {"steps": 28, "guidance_scale": 3.5} if guidance == "distilled" else {"steps": 4, "guidance_scale": 0.0}

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return 512 if self._guidance_embedded(read_json) else 256
