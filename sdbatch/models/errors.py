"""The models' errors: a model that cannot be used, a family that cannot be decided; what a
pickle checkpoint is named and the recipe that converts one."""

from __future__ import annotations

from pathlib import Path

from sdbatch.errors import BadInput

#: pickle checkpoint suffixes: never loaded (the one pickle policy: ``pins``)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

#: a GGUF-quantized transformer (FLUX.1, Qwen-Image, Z-Image as city96/QuantStack publish them)
GGUF_SUFFIX = ".gguf"

#: what a single-file checkpoint (``model.name`` with ``model.config``) may be
SINGLE_FILE_SUFFIXES = (".safetensors", GGUF_SUFFIX)


class ModelError(BadInput, ValueError):
    """The model cannot be used: the message names the model and the fix."""


class FamilyError(BadInput, ValueError):
    """The folder is not a model family sdbatch runs; the message names the class and the fix."""


def pickle_checkpoint_fix(name: str) -> str:
    """The refusal of a pickle checkpoint (``.ckpt``, ``.pt``, …) and the recipe converting it."""
    stem = Path(name).with_suffix(".safetensors").name
    return ("a pickle checkpoint, which sdbatch never loads (unpickling runs code). Convert it once, where you trust "
            "the file: python -c \"import torch, safetensors.torch as st; sd = torch.load('" + name + "', "
            "map_location='cpu', weights_only=True); st.save_file({k: v.contiguous() for k, v in "
            "sd.get('state_dict', sd).items() if hasattr(v, 'contiguous')}, '" + stem + "')\", then pass --model "
            + stem + " with --model-config (the diffusers folder of its architecture)")
