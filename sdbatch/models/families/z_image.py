"""Z-Image and Z-Image-Turbo: ``ZImagePipeline``, a single-stream flow-matching transformer
conditioned on a Qwen3 LLM text encoder (its prompt in a chat template, 512 tokens), shifted
VAE latents.

``guidance_scale`` is classifier-free guidance with the negative prompt; 0 turns the
unconditional branch off, as Z-Image-Turbo is run. Turbo folders are told apart by their
scheduler config (a fixed shift of 3, no dynamic shifting, as Tongyi-MAI ship it) and default
to its 9 steps (8 transformer passes) and guidance 0; other folders to the pipeline's 50 and 5.
The pipeline renders 1024×1024 unless told otherwise, whatever the configs say, and takes sizes
that are multiples of the VAE factor × its 2×2 patches. No CLIP encoder: no clip_skip."""

from __future__ import annotations

from typing import Any

from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import DiffusersFamily, Guidance, ModelTraits
from sdbatch.models.families.chat import LLM_MAX_SEQUENCE_LENGTH, MU_SAMPLERS, chat_wrapper, prompt_budget


class ZImage(DiffusersFamily):
    name = "Z-Image"
    class_name = "ZImagePipeline"
    txt2img = "ZImagePipeline"
    img2img = "ZImageImg2ImgPipeline"
    denoiser = "transformer"
    samplers = MU_SAMPLERS
    text_encoder_counts_layers = False
    takes_clip_skip = False
    packing = 2  # the transformer's 2×2 patches (all_patch_size), not in a patch_size key
    default_size = 1024  # ZImagePipeline.__call__: height = height or 1024
    unconditional_above = 0.0  # ZImagePipeline.do_classifier_free_guidance: guidance_scale > 0

    def native_size(self, read_json: JsonReader, where: str) -> tuple[int, int]:
        return self.default_size, self.default_size

    def parameter_meaning(self, traits: ModelTraits) -> list[str]:
        return [*super().parameter_meaning(traits),
                "guidance_scale 0 turns the unconditional branch off (a row setting negative_prompt is then refused)"]

    def variant(self, read_json: JsonReader) -> str | None:
        scheduler = read_json("scheduler/scheduler_config.json") or {}
        fixed_shift_3 = scheduler.get("use_dynamic_shifting") is False and scheduler.get("shift") == 3.0
        return "turbo" if fixed_shift_3 else None

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        if self.variant(read_json) == "turbo":
            return {"steps": 9, "guidance_scale": 0.0}
        return {"steps": 50, "guidance_scale": 5.0}  # ZImagePipeline.__call__'s

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return LLM_MAX_SEQUENCE_LENGTH

    def prompt_tokenizers(self, pipe: Any, traits: ModelTraits) -> list[tuple[Any, int]]:
        assert traits.max_sequence_length is not None
        wrap = chat_wrapper(pipe.tokenizer, enable_thinking=True)
        return [prompt_budget(pipe.tokenizer, traits.max_sequence_length, wrap)]
