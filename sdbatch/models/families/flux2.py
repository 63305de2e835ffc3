"""FLUX.2 [klein]: ``Flux2KleinPipeline``, a flow-matching MMDiT conditioned on the hidden states
of a Qwen3 LLM (three of its layers side by side), with a VAE whose latents are patchified 2×2
and normalised by its batch-norm statistics.

``guidance_scale`` is classifier-free guidance against an empty prompt for the base models;
the pipeline takes no negative prompt, so a row that sets one is refused. Step-distilled
folders (``is_distilled`` in model_index.json) run without the unconditional branch and ignore
``guidance_scale``. [klein] has no strength-based img2img (its ``image`` argument is a reference
for editing), so init images are refused too, as is clip_skip (no CLIP encoder). The native
size is the pipeline's ``default_sample_size`` (128) × the VAE factor; sizes must be multiples
of that factor × the 2×2 patches. The pipeline returns its latents unpatchified and
de-normalised, so they decode as they are."""

from __future__ import annotations

from typing import Any

from sdbatch.data.row import Row
from sdbatch.data.samplers import family_samplers
from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import ALL_COLUMNS, DiffusersFamily, vae_scale

DEFAULT_SAMPLE_SIZE = 128  # Flux2KleinPipeline.default_sample_size (latent pixels per side)


class Flux2Klein(DiffusersFamily):
    name = "FLUX.2 [klein]"
    class_name = "Flux2KleinPipeline"
    txt2img = "Flux2KleinPipeline"
    img2img = ""  # none: [klein]'s image input is an editing reference, not an init image
    denoiser = "transformer"
    samplers = family_samplers(flow=True)
    honours = ALL_COLUMNS - {"clip_skip", "negative_prompt", "init_image", "strength"}
    text_encoder_counts_layers = False

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        side = DEFAULT_SAMPLE_SIZE * vae_scale(read_json, where)
        return side, side

    def size_multiple(self, read_json: JsonReader, where: str) -> int:
        return vae_scale(read_json, where) * 2

    def pipeline_kwargs(self, rows: list[Row]) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(rows)
        del kwargs["negative_prompt"]  # the pipeline guides against an empty prompt of its own
        return kwargs

    def decode_input(self, vae: Any, latents: Any) -> Any:
        return latents.to(vae.dtype)
