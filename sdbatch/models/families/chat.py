"""What the LLM-encoder families (Z-Image, Qwen-Image, FLUX.2 [klein]) share: the prompt is
wrapped in a chat template before it is tokenized and cut at ``max_sequence_length`` tokens, so
the prompt itself gets that many tokens less the template's (``prompt_budget``); and these
pipelines compute a resolution-dependent shift (``mu``) that only the Euler flow scheduler
takes (``MU_SAMPLERS``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdbatch.data.samplers import DEFAULT_SAMPLER

#: the samplers of a pipeline that passes ``mu`` to its scheduler's set_timesteps
MU_SAMPLERS: tuple[str, ...] = (DEFAULT_SAMPLER, "flow_euler")

#: the max_sequence_length these pipelines default to
LLM_MAX_SEQUENCE_LENGTH = 512


def prompt_budget(tokenizer: Any, limit: int, wrap: Callable[[str], str], dropped: int = 0) -> tuple[Any, int]:
    """``(tokenizer, tokens left for the prompt)`` for ``Tokenizers``: ``limit`` less the tokens
    ``wrap`` (the pipeline's template) adds around an empty prompt, plus the ``dropped`` leading
    template tokens a pipeline removes after encoding (Qwen-Image's)."""
    overhead = len(tokenizer(wrap(""), add_special_tokens=False)["input_ids"]) - dropped
    return tokenizer, limit - overhead


def chat_wrapper(tokenizer: Any, **template: Any) -> Callable[[str], str]:
    """The pipeline's ``apply_chat_template`` of one user message, as a function of the prompt."""
    return lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                        add_generation_prompt=True, **template)
