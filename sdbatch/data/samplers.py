"""The sampler table: each sampler's name, A1111 name, diffusers scheduler class and overrides, and
which families take it (flow-matching or diffusion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str  # the sdbatch name, as manifests and specs write it
    a1111: str  # the AUTOMATIC1111 sampler name written in infotext
    diffusers_class: str  # a scheduler class exported by ``diffusers``
    overrides: dict[str, Any] = field(default_factory=dict)  # on top of the model's scheduler config
    requires: tuple[str, ...] = ()  # modules the class imports when built (pip names)
    flow: bool = False  # a flow-matching sampler (the SD3 family's); the others predict noise


#: ``dpmpp_2m_karras`` is written with the legacy single A1111 name "DPM++ 2M Karras", which
#: every infotext parser understands (encode.py).
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("lms", "LMS", "LMSDiscreteScheduler", requires=("scipy",)),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("flow_euler", "Euler", "FlowMatchEulerDiscreteScheduler", flow=True),
    Sampler("flow_heun", "Heun", "FlowMatchHeunDiscreteScheduler", flow=True),
)}


#: The model's own scheduler, as its folder configures it (every family accepts it).
DEFAULT_SAMPLER = "default"


#: Every sampler name a row or the job may give.
SCHEDULERS: tuple[str, ...] = (DEFAULT_SAMPLER, *SAMPLERS)


#: The A1111 name of a scheduler by diffusers class (sampler ``default`` writes its model's
#: scheduler this way); the first sampler of a class names it ("DPM++ 2M", not "… Karras").
A1111_BY_CLASS: dict[str, str] = {s.diffusers_class: s.a1111 for s in reversed(SAMPLERS.values())}


#: AUTOMATIC1111's sampler names (case-insensitive) → sdbatch's, for manifests and ``--scheduler``
#: written the A1111 way; a name both kinds share ("Euler") means the noise-prediction sampler.
SAMPLER_BY_A1111: dict[str, str] = {s.a1111.lower(): s.name for s in reversed(SAMPLERS.values())}


def sampler_name(value: str) -> str:
    """sdbatch's name of a sampler written either way (``DPM++ 2M Karras`` → ``dpmpp_2m_karras``);
    any other value unchanged, for validation to refuse."""
    return value if value in SCHEDULERS else SAMPLER_BY_A1111.get(value.strip().lower(), value)


def family_samplers(flow: bool) -> tuple[str, ...]:
    """The samplers of the flow-matching families (``flow``) or of the noise-prediction ones."""
    return (DEFAULT_SAMPLER, *(s.name for s in SAMPLERS.values() if s.flow == flow))
