"""Prompt-embedding reuse: each distinct (prompt, negative prompt) is encoded once per worker.

Dataset manifests repeat prompts across many seeds (10 classes × 200 seeds is 10 prompts), and
every batch would otherwise run the text encoders again over the same text. ``PromptCache``
wraps a pipeline's own ``encode_prompt``: a batch's call is answered row by row from a bounded
LRU, each missing row encoded alone by the original ``encode_prompt`` (with the batch's other
arguments), and the rows' embeddings concatenated in batch order — the same tensors, in the
same layout, the batched call returns, so it works for every family's ``encode_prompt``
(SD's two outputs, SDXL's and SD3's four) without knowing their arguments.

The key is the pipeline class, the identity of its text encoders, every other argument of the
call (device, guidance on or off, clip skip, LoRA scale, sequence length, …), the text of each
prompt argument for that row, and the batch's adapter set (``context``: a LoRA on a text encoder
changes its output). A row's embedding no longer depends on its batch-mates (on CPU a CLIP
encoder's output for a row alone and inside a batch are the same bytes; tests compare images).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

#: encode_prompt arguments that hold text, one entry per row when a list
PROMPT_ARGUMENTS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3")
#: arguments that, when given, mean the caller already has embeddings: the call is passed through
EMBEDDING_ARGUMENTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

#: default bound on what the cache holds (the embeddings' bytes, on the model's device): SDXL's
#: pair of a prompt and its negative is ~0.6 MB in fp16, so ~400 distinct prompts
DEFAULT_MAX_BYTES = 256 * 2**20


class PromptCache:
    """A bounded LRU of per-row prompt embeddings, shared by the pipelines it is installed on."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.context: Hashable = None  # the batch's adapter set, set by the runtime before each call
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0

    def install(self, pipe: Any) -> None:
        """Answer ``pipe.encode_prompt`` from this cache (an instance attribute shadows the method)."""
        original = pipe.encode_prompt
        signature = inspect.signature(original)
        owner = (type(pipe).__name__, *(id(getattr(pipe, name, None)) for name in TEXT_ENCODERS))

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            arguments = dict(call.arguments)
            return self._encode(original, owner, arguments)

        pipe.encode_prompt = encode_prompt

    def _encode(self, original: Any, owner: tuple, arguments: dict[str, Any]) -> Any:
        texts = {name: arguments.pop(name) for name in PROMPT_ARGUMENTS if name in arguments}
        prompt = texts.get("prompt")
        if prompt is None or any(arguments.get(name) is not None for name in EMBEDDING_ARGUMENTS):
            return original(**texts, **arguments)
        rows = len(prompt) if isinstance(prompt, list) else 1
        settings = tuple(sorted((name, _hashable(value)) for name, value in arguments.items()))
        per_row = []
        for i in range(rows):
            row_texts = {name: value[i] if isinstance(value, list) else value for name, value in texts.items()}
            key = (owner, settings, self.context, tuple(sorted(row_texts.items())))
            per_row.append(self._get(key) if key in self._entries else self._put(key, original(
                **{name: None if value is None else [value] for name, value in row_texts.items()}, **arguments)))
        return _concatenate(per_row, arguments.get("num_images_per_prompt") or 1)

    def _get(self, key: Hashable) -> Any:
        self.hits += 1
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def _put(self, key: Hashable, value: Any) -> Any:
        self.misses += 1
        size = sum(t.element_size() * t.nelement() for t in _tensors(value))
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
        return value


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _tensors(value: Any) -> list[Any]:
    parts = value if isinstance(value, tuple) else (value,)
    return [p for p in parts if hasattr(p, "nelement")]


def _concatenate(per_row: list[Any], per_prompt: int) -> Any:
    """The rows' outputs joined as one batched call returns them: each per-row tensor (first
    dimension ``per_prompt``, the images per prompt) concatenated along it; an output that is
    not per row (FLUX's text ids: tokens × 3) or None taken from the first row."""
    first = per_row[0]
    if not isinstance(first, tuple):
        return torch.cat(per_row)
    return tuple(
        torch.cat([row[i] for row in per_row]) if isinstance(part, torch.Tensor) and part.shape[0] == per_prompt else part
        for i, part in enumerate(first))
