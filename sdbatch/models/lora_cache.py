"""LoRA adapters loaded once each into a pipeline and switched per batch, never fused."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from sdbatch.data.loras import LoraSet
from sdbatch.models.errors import ModelError
from sdbatch.models.pins import check_safetensors, sha256_hex
from sdbatch.storage.open import read_uri

log = logging.getLogger("sdbatch.generate")


#: LoRA adapters a worker keeps loaded; the least recently used is unloaded beyond this.
LORA_CACHE_SIZE = 8


class LoraCache:
    """The job's declared adapters (name -> path) and those loaded into the pipeline, least
    recently used first. An adapter is read, checked (safetensors only) and loaded at most
    once while it stays among the ``LORA_CACHE_SIZE`` most recently used."""

    def __init__(self, pipe: DiffusionPipeline, declared: dict[str, str], endpoint_url: str | None):
        self.pipe = pipe
        self.declared = dict(declared)
        self.endpoint_url = endpoint_url
        self.sha256: dict[str, str] = {}  # of every adapter read so far
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.active: LoraSet | None = None  # None: nothing set yet

    def _load(self, name: str) -> None:
        from safetensors.torch import load as load_safetensors

        if name not in self.declared:
            raise ModelError(f"LoRA {name!r} is not declared for this job (declared: {', '.join(self.declared) or 'none'})")
        data = read_uri(self.declared[name], endpoint_url=self.endpoint_url)
        check_safetensors(data, f"{name}={self.declared[name]}")
        self.sha256[name] = sha256_hex(data)
        self.pipe.load_lora_weights(load_safetensors(data), adapter_name=name)
        log.info("loaded LoRA %s (sha256 %s)", name, self.sha256[name][:10])

    @torch.inference_mode()  # adapters load as inference tensors; toggling them must stay in that mode
    def use(self, loras: LoraSet) -> None:
        """Make ``loras`` the pipeline's active adapters (none: adapters disabled)."""
        if loras == self.active:
            return
        for name, _ in loras:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= LORA_CACHE_SIZE:
                evicted, _ = self.loaded.popitem(last=False)
                self.pipe.delete_adapters(evicted)
            self._load(name)
            self.loaded[name] = None
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
        elif self.loaded:
            self.pipe.disable_lora()
        self.active = loras

    def record(self, loras: LoraSet) -> list[dict[str, Any]]:
        """Each adapter's name, scale and sha256, for the image record and the index."""
        return [{"name": n, "scale": s, "sha256": self.sha256.get(n)} for n, s in loras]


@dataclass
class Tokenizers:
    """The tokenizers of the text encoders that read the prompt, each with the number of tokens
    its encoder reads (special tokens included), to say where a prompt is cut off."""

    tokenizers: list[tuple[Any, int]] = field(default_factory=list)

    def truncated_at(self, prompt: str) -> int | None:
        """The character offset where the first text encoder to stop reading stops (None: all read)."""
        cuts = []
        for tok, length in self.tokenizers:
            limit = length - len(tok("")["input_ids"])  # the special tokens it adds (CLIP: start and end; T5: end)
            try:
                enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
            except NotImplementedError:  # a tokenizer without offsets: where its kept tokens' text ends
                ids = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"]
                if len(ids) > limit:
                    cuts.append(len(tok.decode(ids[:limit])))
                continue
            if len(enc["input_ids"]) > limit:
                cuts.append(int(enc["offset_mapping"][limit][0]))
        return min(cuts) if cuts else None
