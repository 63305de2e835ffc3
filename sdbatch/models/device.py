"""The device and dtype a worker generates on, and the software versions an image records."""

from __future__ import annotations

import platform

import diffusers
import torch
import transformers

from sdbatch.models.errors import ModelError


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but this worker sees no CUDA device; use 'auto' or 'cpu'")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def software_versions() -> dict[str, str]:
    return {
        # a plain str: torch's is a TorchVersion, and unpickling one imports torch, in every
        # process the record reaches (the driver's ready(), each image encoder): seconds each
        "torch": str(torch.__version__),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
