"""Speed profiles: the job's ``speed`` section, its presets and switches, and what a worker
records of them. Pure (no torch): ``models.speed_runtime`` applies the switches to a loaded
pipeline.

A profile is a named preset (``exact``, ``fast``, ``fastest``) that individual switches may
override. ``exact`` is sdbatch's behaviour before profiles existed (fp16 + SDPA +
channels_last on CUDA, nothing lossy): bit-reproducible on the same kind of machine. The other
presets trade that for speed:

- ``regional_compile`` — ``torch.compile`` of the denoiser's repeated blocks only
  (diffusers' ``compile_repeated_blocks``): most of a whole-model compile's speed at a fraction
  of its compile time; compiled once per worker and batch shape (the runtime's warm-up).
- ``cuda_graphs`` — those blocks compiled with ``mode="reduce-overhead"`` (CUDA graphs).
- ``fuse_qkv`` — the attention's query/key/value projections fused into one matmul.
- ``quantize`` — torchao dynamic quantisation of the denoiser's linear layers: ``fp8`` (GPUs of
  compute capability ≥ 8.9), ``int8``, or ``auto`` (fp8 where the GPU has it, else int8).
- ``step_cache`` — diffusers' First-Block Cache: a step whose first block's residual changed by
  less than ``step_cache_threshold`` (relative mean absolute difference) reuses the previous
  step's output of the other blocks. Only denoisers with diffusers' cache hooks take it.

Presets ask for a switch "where this worker can": a preset switch the worker cannot apply (CUDA
graphs or fp8 on a CPU, torchao not installed, a step cache on a UNet) is skipped, and the image
records the switches applied and each skipped one with its reason, so the record says what ran.
A switch the user sets explicitly is a requirement: one that needs a GPU, in a job whose workers
have none, is refused with the spec (exit 2); one a GPU worker cannot apply fails its start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Profile = Literal["exact", "fast", "fastest"]
Quantize = Literal["none", "auto", "int8", "fp8"]
StepCache = Literal["none", "first_block"]


@dataclass(frozen=True)
class SpeedSwitches:
    """Every switch of a profile, resolved (no "unset")."""

    regional_compile: bool = False
    cuda_graphs: bool = False
    fuse_qkv: bool = False
    quantize: Quantize = "none"
    step_cache: StepCache = "none"
    step_cache_threshold: float = 0.0

    def on(self) -> dict[str, Any]:
        """The switches turned on, with their values (the threshold only with its cache)."""
        values = asdict(self)
        if self.step_cache == "none":
            values.pop("step_cache_threshold")
        return {name: value for name, value in values.items() if value not in (False, "none")}


#: The presets. ``fastest``'s threshold is the one the First-Block Cache's authors give for
#: FLUX.1-dev (ParaAttention: 0.08, ~2× at a small quality cost); diffusers' default is 0.05.
PRESETS: dict[str, SpeedSwitches] = {
    "exact": SpeedSwitches(),
    "fast": SpeedSwitches(regional_compile=True, cuda_graphs=True, fuse_qkv=True, quantize="auto"),
}
PRESETS["fastest"] = replace(PRESETS["fast"], step_cache="first_block", step_cache_threshold=0.08)

#: Switches that only a CUDA device can apply (a job whose workers have no GPU refuses them
#: when set explicitly; a preset skips them there).
GPU_ONLY = ("cuda_graphs", "quantize")


class SpeedSpec(BaseModel):
    """The job's ``speed`` section: a preset and, optionally, switches that override it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: Profile = Field(
        "exact", description="exact: bit-reproducible (today's behaviour); fast: regional torch.compile, CUDA graphs, "
        "fused QKV, fp8/int8 quantisation where the GPU has it; fastest: fast plus a First-Block step cache "
        "(threshold 0.08). Switches a worker cannot apply are skipped and recorded")
    regional_compile: bool | None = Field(None, description="torch.compile the denoiser's repeated blocks (default: the profile's)")
    cuda_graphs: bool | None = Field(None, description="compile with CUDA graphs (reduce-overhead); needs regional_compile and a GPU")
    fuse_qkv: bool | None = Field(None, description="fuse the attention's QKV projections (default: the profile's)")
    quantize: Quantize | None = Field(None, description="torchao dynamic quantisation of the denoiser; GPU only (default: the profile's)")
    step_cache: StepCache | None = Field(None, description="First-Block Cache on denoisers with diffusers' cache hooks (default: the profile's)")
    step_cache_threshold: float | None = Field(None, gt=0, le=1, description="the step cache's threshold (default: the profile's, 0.08)")

    @model_validator(mode="after")
    def _consistent(self) -> SpeedSpec:
        switches = self.switches()
        if switches.cuda_graphs and not switches.regional_compile:
            raise ValueError("cuda_graphs needs regional_compile: CUDA graphs are captured by torch.compile; "
                             "set speed.regional_compile=true or speed.cuda_graphs=false")
        if self.step_cache_threshold is not None and switches.step_cache == "none":
            raise ValueError("step_cache_threshold is set but no step cache is on; set speed.step_cache=first_block")
        return self

    def explicit(self) -> dict[str, Any]:
        """The switches the spec sets itself (not from the preset)."""
        return {name: value for name, value in self.model_dump(exclude={"profile"}).items() if value is not None}

    def switches(self) -> SpeedSwitches:
        switches = replace(PRESETS[self.profile], **self.explicit())
        if switches.step_cache != "none" and not switches.step_cache_threshold:
            switches = replace(switches, step_cache_threshold=PRESETS["fastest"].step_cache_threshold)
        return switches

    @property
    def is_exact(self) -> bool:
        return not self.switches().on()

    def fingerprint_value(self) -> dict[str, Any] | None:
        """What the job fingerprint holds: None for a profile with nothing on (so jobs from
        before profiles keep their fingerprint), else the profile and its resolved switches."""
        return None if self.is_exact else {"profile": self.profile, **self.switches().on()}

    def gpu_only_set(self) -> list[str]:
        """Explicitly set GPU-only switches that are on."""
        return [name for name, value in self.explicit().items() if name in GPU_ONLY and value not in (False, "none")]

    def summary(self) -> str:
        """``fast (regional_compile, fuse_qkv, quantize=auto)``: the profile and what it turns on."""
        on = self.switches().on()
        parts = [name if value is True else f"{name}={value}" for name, value in on.items()]
        return f"{self.profile} ({', '.join(parts)})" if parts else self.profile


@dataclass(frozen=True)
class AppliedSpeed:
    """What a worker applied of its profile: recorded in every image (``ImageRecord.speed``)."""

    profile: str
    applied: dict[str, Any]  # switch -> value, as applied (quantize: the dtype chosen)
    skipped: dict[str, str]  # switch -> why this worker could not apply it

    @property
    def bit_reproducible(self) -> bool:
        """Nothing on that changes the low bits from one device (or kernel choice) to another."""
        return not self.applied

    def record(self) -> dict[str, Any] | None:
        """The image record's ``speed`` value; None when nothing was asked (``exact``), so its
        images are byte-identical to those made before profiles."""
        if not self.applied and not self.skipped and self.profile == "exact":
            return None
        return {"profile": self.profile, "applied": dict(self.applied), "skipped": dict(self.skipped)}

    @classmethod
    def from_record(cls, value: dict[str, Any] | None) -> AppliedSpeed:
        value = value or {}
        return cls(str(value.get("profile") or "exact"), dict(value.get("applied") or {}), dict(value.get("skipped") or {}))


def infotext_value(speed: dict[str, Any] | None) -> str | None:
    """The infotext's ``Speed profile`` value: the profile and the switches applied."""
    if not speed:
        return None
    applied = AppliedSpeed.from_record(speed).applied
    parts = [name if value is True else f"{name}={value}" for name, value in applied.items()]
    return f"{speed.get('profile')} ({' '.join(parts)})" if parts else str(speed.get("profile"))
