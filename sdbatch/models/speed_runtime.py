"""Applying a speed profile (``models.speed``) to a loaded pipeline's denoiser: fused QKV,
torchao quantisation, diffusers' First-Block Cache, regional ``torch.compile`` (with CUDA
graphs), in that order (compilation last, so it traces the fused, quantised, hooked blocks).

Each switch is applied or, when this worker cannot apply it, skipped with the reason; a switch
the spec set explicitly is required, so its skip is a ``ModelError`` (the worker's start fails)
instead. The result (``AppliedSpeed``) is what every image records."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch

from sdbatch.models.errors import ModelError
from sdbatch.models.speed import AppliedSpeed, SpeedSpec

log = logging.getLogger("sdbatch.generate")


class _Skip(Exception):
    """A switch this worker cannot apply; the message says why."""


def apply_speed(pipe: Any, denoiser_name: str, speed: SpeedSpec, device: str) -> AppliedSpeed:
    """Apply ``speed``'s switches to ``pipe``'s denoiser (and VAE, for fused QKV) on ``device``."""
    switches, explicit = speed.switches(), speed.explicit()
    denoiser = getattr(pipe, denoiser_name)
    applied: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    graphs = False
    if switches.cuda_graphs:
        try:
            _need_cuda(device)
            graphs = True
        except _Skip as exc:
            _refuse_if_explicit("cuda_graphs", explicit, exc)
            skipped["cuda_graphs"] = str(exc)
    steps = (
        ("fuse_qkv", switches.fuse_qkv, lambda: _fuse_qkv(pipe, denoiser)),
        ("quantize", switches.quantize != "none", lambda: _quantize(denoiser, switches.quantize, device)),
        ("step_cache", switches.step_cache != "none", lambda: _step_cache(denoiser, switches.step_cache_threshold)),
        ("regional_compile", switches.regional_compile, lambda: _regional_compile(denoiser, graphs)),
    )
    for name, wanted, apply in steps:
        if not wanted:
            continue
        try:
            applied[name] = apply()
        except _Skip as exc:
            _refuse_if_explicit(name, explicit, exc)
            skipped[name] = str(exc)
    if graphs:
        if "regional_compile" in applied:
            applied["cuda_graphs"] = True
        else:
            skipped["cuda_graphs"] = "CUDA graphs are captured by the regional compilation, which was skipped"
    result = AppliedSpeed(speed.profile, applied, skipped)
    if applied or skipped:
        log.info("speed profile %s: applied %s%s", speed.profile, applied or "nothing",
                 "".join(f"; skipped {name}: {why}" for name, why in skipped.items()))
    return result


def _refuse_if_explicit(name: str, explicit: dict[str, Any], exc: _Skip) -> None:
    if name in explicit:
        raise ModelError(f"speed.{name}={explicit[name]} cannot be applied on this worker: {exc}. "
                         f"Fix: leave speed.{name} to the profile, which skips it where it cannot apply, "
                         "or run the job on workers that can") from None


def _need_cuda(device: str) -> None:
    if device != "cuda":
        raise _Skip(f"needs a CUDA device; this worker runs on {device}")


def _fuse_qkv(pipe: Any, denoiser: Any) -> bool:
    if not hasattr(denoiser, "fuse_qkv_projections"):
        raise _Skip(f"{type(denoiser).__name__} cannot fuse its QKV projections")
    try:
        denoiser.fuse_qkv_projections()
    except ValueError as exc:  # diffusers: attention with added KV projections
        raise _Skip(str(exc)) from None
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "fuse_qkv_projections"):
        vae.fuse_qkv_projections()
    return True


def _quantize(denoiser: Any, kind: str, device: str) -> str:
    _need_cuda(device)
    if importlib.util.find_spec("torchao") is None:
        raise _Skip("torchao is not installed (pip install torchao)")
    if kind == "auto":
        kind = "fp8" if torch.cuda.get_device_capability() >= (8, 9) else "int8"
    elif kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise _Skip(f"fp8 needs compute capability 8.9 or higher; this GPU has {torch.cuda.get_device_capability()}")
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        quantize_,
    )

    quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig() if kind == "fp8" else Int8DynamicActivationInt8WeightConfig())
    return kind


def _step_cache(denoiser: Any, threshold: float) -> float:
    if not hasattr(denoiser, "enable_cache"):
        raise _Skip(f"{type(denoiser).__name__} has no diffusers cache hooks (the step cache applies to transformers "
                    "such as FLUX's)")
    from diffusers.hooks import FirstBlockCacheConfig

    denoiser.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return threshold


def _regional_compile(denoiser: Any, cuda_graphs: bool) -> bool:
    if not getattr(denoiser, "_repeated_blocks", None):
        raise _Skip(f"{type(denoiser).__name__} declares no repeated blocks to compile")
    denoiser.compile_repeated_blocks(fullgraph=True, **({"mode": "reduce-overhead"} if cuda_graphs else {}))
    return True
