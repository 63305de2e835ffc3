"""Chroma: ``ChromaPipeline``, FLUX.1 [schnell]'s architecture retrained with real
classifier-free guidance: a T5 prompt encoder alone (no CLIP, so no clip_skip), a negative
prompt and ``guidance_scale`` as CFG (the pipeline's defaults: 35 steps, 5.0; 512 T5 tokens),
packed latents and the native size of the FLUX.1 pipelines (``flux.PackedTransformerFamily``)."""

from __future__ import annotations

from typing import Any

from sdbatch.models.configs import JsonReader
from sdbatch.models.families.base import Guidance
from sdbatch.models.families.flux import PackedTransformerFamily


class Chroma(PackedTransformerFamily):
    name = "Chroma"
    class_name = "ChromaPipeline"
    txt2img = "ChromaPipeline"
    img2img = "ChromaImg2ImgPipeline"
    guidance = "cfg"

    def model_defaults(self, read_json: JsonReader, guidance: Guidance) -> dict[str, Any]:
        return {"steps": 35, "guidance_scale": 5.0}

    def max_sequence_length(self, read_json: JsonReader) -> int | None:
        return 512
