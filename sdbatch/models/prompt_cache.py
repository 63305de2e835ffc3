"""Prompt-embedding reuse: each distinct (prompt, negative prompt) is encoded once per worker.

Dataset manifests repeat prompts across many seeds (10 classes × 200 seeds is 10 prompts), and
every batch would otherwise run the text encoders again over the same text. ``PromptCache``
wraps a pipeline's own ``encode_prompt``: a batch's call is answered row by row from a bounded
LRU; the distinct rows it lacks are encoded by the original ``encode_prompt`` in one call of the
batch's row count (with the batch's other arguments), and the rows' embeddings concatenated in
batch order — the same tensors, in the same layout, the batched call returns, so it works for
every family's ``encode_prompt`` (SD's two outputs, SDXL's and SD3's four) without knowing its
arguments. A batch of already-seen prompts runs no text encoder at all.

The key is the pipeline class, the identity of its text encoders, every other argument of the
call (device, guidance on or off, clip skip, LoRA scale, sequence length, …), the text of each
prompt argument for that row, and the batch's adapter set (``context``: a LoRA on a text encoder
changes its output) — and the batch's row count: a row's embedding is computed in a call of as
many rows as its batch's (padded with repeats), because a pooled projection of one row alone
differs from the same row's inside a batch in the last bit (SDXL on CPU), while a row's bytes do
not depend on what the other rows of a call hold. Tests compare the images byte for byte.

Below the cache, ``models.prompt_weights`` reads AUTOMATIC1111 syntax (emphasis, BREAK, long
prompts) through compel; the key holds the prompt as written, so weighted embeddings are cached
like any other.
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

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            # the encoders the pipeline holds now: one swapped or removed since is another key
            owner = (type(pipe).__name__, *(id(getattr(pipe, name, None)) for name in TEXT_ENCODERS))
            return self._encode(original, owner, dict(call.arguments))

        pipe.encode_prompt = encode_prompt

    def _encode(self, original: Any, owner: tuple, arguments: dict[str, Any]) -> Any:
        texts = {name: arguments.pop(name) for name in PROMPT_ARGUMENTS if name in arguments}
        prompt = texts.get("prompt")
        if (prompt is None or any(arguments.get(name) is not None for name in EMBEDDING_ARGUMENTS)
                or any(isinstance(value, torch.Tensor) for value in arguments.values())):  # a tensor: no key for it
            return original(**texts, **arguments)
        rows = len(prompt) if isinstance(prompt, list) else 1
        per_prompt = arguments.get("num_images_per_prompt") or 1
        settings = tuple(sorted((name, _hashable(value)) for name, value in arguments.items()))
        row_texts = [{name: value[i] if isinstance(value, list) else value for name, value in texts.items()}
                     for i in range(rows)]
        # the batch's row count is part of the key: an encoder's pooled projection is a matmul
        # whose last bits depend on how many rows it multiplies at once
        keys = [(owner, settings, self.context, rows, tuple(sorted(t.items()))) for t in row_texts]
        fresh = self._encode_missing(original, texts, arguments, dict(zip(keys, row_texts)), rows, per_prompt)
        self.hits += rows - len(fresh)
        per_row = [fresh[key] if key in fresh else self._get(key) for key in keys]
        return _concatenate(per_row, per_prompt)

    def _encode_missing(self, original: Any, texts: dict[str, Any], arguments: dict[str, Any],
                        row_texts: dict[Hashable, dict[str, Any]], rows: int, per_prompt: int) -> dict[Hashable, Any]:
        """The batch's distinct rows the cache lacks, encoded in one call of the batch's own row
        count (padded with the last of them), so each comes out with the bytes the batch's own
        call would have given it; each stored in the cache."""
        missing = [key for key in row_texts if key not in self._entries]
        if not missing:
            return {}
        padded = missing + [missing[-1]] * (rows - len(missing))
        encoded = original(**{name: None if value is None else [row_texts[key][name] for key in padded]
                              for name, value in texts.items()}, **arguments)
        fresh = {key: _row_of(encoded, i, rows * per_prompt, per_prompt) for i, key in enumerate(missing)}
        for key, value in fresh.items():
            self._put(key, value)
        return fresh

    def _get(self, key: Hashable) -> Any:
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


def _row_of(encoded: Any, row: int, batched: int, per_prompt: int) -> Any:
    """Row ``row``'s part of a batched ``encode_prompt`` output (tensors whose first dimension
    is ``batched``, the rows × images per prompt, sliced and copied, so the cache does not keep
    the whole batch's tensor alive; other outputs kept whole)."""
    parts = encoded if isinstance(encoded, tuple) else (encoded,)
    sliced = tuple(p[row * per_prompt:(row + 1) * per_prompt].clone() if isinstance(p, torch.Tensor) and p.shape[0] == batched
                   else p for p in parts)
    return sliced if isinstance(encoded, tuple) else sliced[0]


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
