"""``model.text_encoder_device``: the text encoders on another device than the denoiser.

FLUX.2 [dev]'s Mistral-3 encoder (24B) or Qwen-Image's Qwen2.5-VL (7B) take GPU memory the
denoiser needs for the whole run, while they run once per distinct prompt (``PromptCache``).
With ``cpu`` they stay in host memory: the pipeline is loaded on the CPU, every other
component moved to the worker's device (``place``), and each pipeline's ``encode_prompt`` is
run on the encoders' device and its embeddings moved to the device the pipeline computes on
(``encode_on``), below the prompt cache, so each distinct prompt crosses once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from sdbatch.models.prompt_cache import TEXT_ENCODERS


def place(pipe: Any, device: str, encoder_device: str) -> None:
    """Every module of ``pipe`` on ``device``, its text encoders on ``encoder_device``."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.to(device=torch.device(encoder_device if name in TEXT_ENCODERS else device))


def encode_on(pipe: Any, encoder_device: str) -> None:
    """Run ``pipe.encode_prompt`` with ``device=encoder_device`` (where its text encoders are) and
    hand its tensors to the device the pipeline asked for (an instance attribute shadows the
    method; ``functools.wraps`` keeps the signature the prompt cache binds calls to)."""
    original = pipe.encode_prompt
    signature = inspect.signature(original)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        wanted = call.arguments.get("device") or pipe._execution_device
        return _moved(original(**{**call.arguments, "device": torch.device(encoder_device)}), wanted)

    pipe.encode_prompt = encode_prompt


def _moved(output: Any, device: Any) -> Any:
    """``output`` (a tensor, or a tuple or list holding tensors and None) with its tensors on ``device``."""
    if isinstance(output, torch.Tensor):
        return output.to(device)
    if isinstance(output, (tuple, list)):
        return type(output)(_moved(part, device) for part in output)
    return output
