"""CLIP score: how well each image agrees with its prompt (``scoring.clip_model``).

The model is a transformers CLIP folder (``CLIPModel`` + its processor, as written by
``save_pretrained``), local or under an ``s3://`` prefix (downloaded once per node by
``storage.fetch_model_dir``), safetensors only. For real datasets point it at
``openai/clip-vit-large-patch14`` (the text encoder of SD 1.x) saved locally. The score is the
usual CLIPScore: ``max(100 · cos(image embedding, text embedding), 0)``.

Imports torch: only worker actors load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPModel, CLIPProcessor

from sdbatch.models.cache import fetch_model_dir
from sdbatch.models.pins import check_pickles
from sdbatch.storage.locations import is_s3


class ClipScorer:
    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: str):
        self.model = model
        self.processor = processor
        self.device = device

    @classmethod
    def load(cls, location: str, *, device: str = "cpu", endpoint_url: str | None = None) -> ClipScorer:
        if is_s3(location):
            folder, _ = fetch_model_dir(location, endpoint_url=endpoint_url)
        else:
            folder = Path(location).expanduser()
        check_pickles(location, folder)  # the one pickle policy, as for the diffusion model
        model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        return cls(model, CLIPProcessor.from_pretrained(folder), device)

    @torch.no_grad()
    def score(self, prompts: list[str], images: list[Any]) -> list[float]:
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        cosine = (image * text).sum(dim=-1)
        return [round(max(100.0 * c, 0.0), 4) for c in cosine.tolist()]
