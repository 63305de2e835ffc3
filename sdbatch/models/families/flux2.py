"""FLUX.2 [klein]: ``Flux2KleinPipeline``, a flow-matching MMDiT conditioned on the hidden states
of a Qwen3 LLM (three of its layers side by side; the prompt in a chat template, 512 tokens),
with a VAE whose latents are patchified 2×2 and normalised by its batch-norm statistics.

For the base models ``guidance_scale`` is classifier-free guidance against an empty prompt of
the pipeline's own (its defaults: 50 steps, 4); the pipeline takes no negative prompt, so a row
that sets one is refused. Step-distilled folders (``is_distilled`` in model_index.json) have no
unconditional branch and ignore ``guidance_scale`` (4 steps, guidance unused). [klein] has no
strength-based img2img (its ``image`` argument is a reference for editing), so init images are
refused, as is clip_skip (no CLIP encoder). The native size is the pipeline's
``default_sample_size`` (128) × the VAE factor; sizes are multiples of that factor × the 2×2
patches. The pipeline returns its latents unpatchified and de-normalised: they decode as they are.

FLUX.2 [dev]: ``Flux2Pipeline``, the same transformer architecture (32B) with the distilled
guidance embedding (``guidance_scale`` is that embedding, the pipeline's defaults 50 steps and
4; no unconditional branch, so no negative prompt), conditioned on three hidden layers of a
Mistral-3 (Small 3.1, 24B) text encoder reading the prompt after the pipeline's system message.
Its folder names a ``PixtralProcessor`` as ``tokenizer``, which transformers builds only with
torchvision; a text prompt uses only the processor's tokenizer (the same chat template and
tokens), so sdbatch loads ``tokenizer/`` with ``AutoTokenizer`` and needs no torchvision. Its
``image`` argument is a set of reference images for editing, not a strength-based init image:
init images are refused as for [klein]. With ``output_type="latent"`` the pipeline returns its
latents still packed and normalised: ``unpack_latents`` undoes both as its own decoding does."""

from __future__ import annotations

from typing import Any

from sdbatch.data.row import Row
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import COMMON_COLUMNS, DiffusersFamily, Guidance, ModelTraits
from sdbatch.models.families.chat import LLM_MAX_SEQUENCE_LENGTH, MU_SAMPLERS, chat_wrapper, prompt_budget


class Flux2Klein(DiffusersFamily):
    name = "FLUX.2 [klein]"
    class_name = "Flux2KleinPipeline"
    txt2img = "Flux2KleinPipeline"
    img2img = ""  # none: [klein]'s image input is an editing reference, not an init image
    denoiser = "transformer"
    samplers = MU_SAMPLERS
    honours = COMMON_COLUMNS - {"negative_prompt", "init_image", "strength"}
    text_encoder_counts_layers = False
    takes_clip_skip = False
    default_sample_size = 128
    packing = 2

    def _distilled(self, read_json: JsonReader) -> bool:
        return bool((read_json("model_index.json") or {}).get("is_distilled"))

    def variant(self, read_json: JsonReader) -> str | None:
        return "distilled" if self._distilled(read_json) else None

    def model_guidance(self, read_json: JsonReader) -> Guidance:
        return "none" if self._distilled(read_json) else "cfg"

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        return {"steps": 4, "guidance_scale": 0.0} if guidance == "none" else {"steps": 50, "guidance_scale": 4.0}

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return LLM_MAX_SEQUENCE_LENGTH

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        assert traits.max_sequence_length is not None
        wrap = chat_wrapper(pipe.tokenizer, enable_thinking=False)
        return [prompt_budget(pipe.tokenizer, traits.max_sequence_length, wrap)]

    def guidance_kwargs(self, rows: list[Row], guidance: Guidance) -> dict[str, Any]:
        """guidance_scale alone: the pipeline guides against an empty prompt of its own (the
        distilled variant ignores it; it is then 0, which the pipeline reads as off)."""
        return {"guidance_scale": rows[0].guidance_scale}

    def decode_input(self, vae: Any, latents: Any) -> Any:
        return latents.to(vae.dtype)


class Flux2Dev(Flux2Klein):
    name = "FLUX.2 [dev]"
    class_name = "Flux2Pipeline"
    txt2img = "Flux2Pipeline"
    guidance = "distilled"
    component_classes = {"tokenizer": "AutoTokenizer"}  # not the folder's PixtralProcessor (torchvision)

    def variant(self, read_json: JsonReader) -> str | None:
        return None

    def model_guidance(self, read_json: JsonReader) -> Guidance:
        return "distilled"

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        return {"steps": 50, "guidance_scale": 4.0}

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        """Mistral's tokens after the pipeline's system message (its ``format_input``)."""
        assert traits.max_sequence_length is not None

        def text(content: str) -> list[dict[str, str]]:
            return [{"type": "text", "text": content}]

        def wrap(prompt: str) -> str:
            messages = [{"role": "system", "content": text(pipe.system_message)}, {"role": "user", "content": text(prompt)}]
            return str(pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))

        return [prompt_budget(pipe.tokenizer, traits.max_sequence_length, wrap)]

    def unpack_latents(self, pipe: Any, latents: Any, first: Row) -> Any:
        """(batch, tokens, channels) → the VAE's latent image: the tokens back on their grid
        (row-major, as ``_pack_latents`` laid them), de-normalised by the VAE's batch-norm
        statistics and unpatchified 2×2, as the pipeline's own decoding does."""
        side = pipe.vae_scale_factor * 2
        grid = latents.permute(0, 2, 1).reshape(latents.shape[0], latents.shape[2], first.height // side, first.width // side)
        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
        std = (bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).sqrt().to(grid.device, grid.dtype)
        return pipe._unpatchify_latents(grid * std + mean)
