"""Model loading and batch generation: the only module that imports torch and diffusers.

``Generator.load`` accepts ``builtin:NAME``, a local diffusers folder or an ``s3://`` prefix
holding one (resolved and checked by ``sdbatch.models``), and loads every kind through the same
``from_pretrained`` path (safetensors only).
``Generator.generate`` runs one canonical batch: rows that share size, steps, sampler,
guidance and mode (DESIGN §3). Each row gets its own CPU ``torch.Generator`` seeded with the
row's seed, used for its initial noise and for any per-step noise of ancestral samplers, so a
row's image does not depend on which other rows share its batch.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Library chatter (progress bars, safety-checker and torchvision notices) would bury our
# own log lines in every worker; this must be set before diffusers/transformers import.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers  # noqa: E402
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from sdbatch.manifest import Row
from sdbatch.models import ModelError, fingerprint_model_dir, resolve

log = logging.getLogger("sdbatch.generate")
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

# scheduler name -> (class, config overrides applied on top of the model's own scheduler config)
SCHEDULER_FACTORIES: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}

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
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def resize_for_row(image: Image.Image, width: int, height: int) -> Image.Image:
    """The documented init-image rule: scale to cover width×height keeping the aspect ratio
    (Lanczos), then centre-crop to exactly width×height; RGB."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str  # sha256 over every file of the folder loaded
    pin: str  # what the job pins the model to (sdbatch.models): equals fingerprint for local folders
    device: str
    dtype: str
    versions: dict[str, str]
    threads: int  # torch intra-op threads: on CPU, the reduction order and so the last bit depend on it

    @property
    def short_hash(self) -> str:
        """A1111-style 10-hex model hash."""
        return self.fingerprint[:10]


class Generator:
    """One loaded model replica: a text-to-image pipeline and an img2img pipeline that share
    the same modules, and a per-call scheduler built from the model's own scheduler config."""

    def __init__(self, txt2img: StableDiffusionPipeline, info: ModelInfo):
        self.txt2img = txt2img
        self.img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
        self.info = info
        self._scheduler_config = dict(txt2img.scheduler.config)
        self._sampler_configs: dict[str, dict[str, Any]] = {}
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        model: str = "builtin:shapes",
        *,
        pin: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        endpoint_url: str | None = None,
    ) -> Generator:
        folder, found_pin = resolve(model, pin=pin, endpoint_url=endpoint_url)
        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                dtype=torch_dtype,
                use_safetensors=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                local_files_only=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {model!r} could not be loaded from {folder}: {exc}") from exc
        pipe = pipe.to(device)
        info = ModelInfo(
            name=model,
            fingerprint=fingerprint_model_dir(folder) if model.startswith("s3://") else found_pin,
            pin=found_pin,
            device=device,
            dtype=str(torch_dtype).removeprefix("torch."),
            versions=software_versions(),
            threads=torch.get_num_threads(),
        )
        log.info("loaded model %s on %s (%s), fingerprint %s", model, device, info.dtype, info.short_hash)
        return cls(pipe, info)

    def make_scheduler(self, name: str):
        try:
            scheduler_cls, overrides = SCHEDULER_FACTORIES[name]
        except KeyError:
            raise ModelError(
                f"scheduler {name!r} is not supported; use one of {', '.join(SCHEDULER_FACTORIES)}"
            ) from None
        return scheduler_cls.from_config({**self._scheduler_config, **overrides})

    def scheduler_config(self, name: str) -> dict[str, Any]:
        """The full config of the sampler as used, for the metadata record (built once per
        name: every image's record needs it, and building a scheduler costs milliseconds)."""
        if name not in self._sampler_configs:
            self._sampler_configs[name] = dict(self.make_scheduler(name).config)
        return self._sampler_configs[name]

    @torch.inference_mode()
    def generate(self, rows: list[Row], init_images: list[Image.Image | None] | None = None) -> list[Image.Image]:
        """Generate one canonical batch; all rows must share ``Row.batch_key()``."""
        if not rows:
            return []
        key = rows[0].batch_key()
        if any(r.batch_key() != key for r in rows):
            raise ValueError("generate() takes one canonical batch: all rows must share batch_key()")
        first = rows[0]
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in rows]
        common = dict(
            prompt=[r.prompt for r in rows],
            negative_prompt=[r.negative_prompt for r in rows],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type="pil",
        )
        pipe = self.img2img if first.is_img2img else self.txt2img
        pipe.scheduler = self.make_scheduler(first.scheduler)
        if first.is_img2img:
            if init_images is None or len(init_images) != len(rows) or any(i is None for i in init_images):
                raise ValueError("img2img rows need one init image each")
            images = [resize_for_row(img, first.width, first.height) for img in init_images]
            result = pipe(image=images, strength=first.strength, **common)
        else:
            result = pipe(height=first.height, width=first.width, **common)
        return list(result.images)
