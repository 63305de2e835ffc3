"""Model loading and batch generation: the only module that imports torch and diffusers.

``Generator.load`` accepts ``builtin:NAME``, a local diffusers folder or an ``s3://`` prefix
holding one, finds its family (``families.FAMILIES``: SD 1.x/2.x, SDXL, SD3) and loads the
family's text-to-image pipeline through ``from_pretrained`` (safetensors only); its img2img
pipeline is made with ``from_pipe``, sharing every module (no second copy of the weights).
``Generator.generate`` runs one canonical batch: rows that share size, steps, sampler,
guidance, mode and adapter set (DESIGN §3). Each row gets its own CPU ``torch.Generator``
seeded with the row's seed, used for its initial noise and for any per-step noise of
ancestral samplers, so a row's image does not depend on which other rows share its batch.
LoRA adapters are loaded once each (``LoraCache``) and switched per batch with
``set_adapters``, never fused, so a scale of 0 renders exactly as no adapter.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
from collections import OrderedDict
from dataclasses import dataclass, field
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
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image

from sdbatch.families import DEFAULT_SAMPLER, Family, local_traits
from sdbatch.lora import LoraSet, check_safetensors, sha256_hex
from sdbatch.manifest import Row
from sdbatch.models import fingerprint_model_dir, local_model_dir
from sdbatch.storage import read_uri

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
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow_heun": (FlowMatchHeunDiscreteScheduler, {}),
}
#: from_pretrained arguments of one family: SD 1.x/2.x folders may name a safety checker
#: sdbatch never runs (dataset generation; the user's own filter comes after).
LOAD_OPTIONS: dict[str, dict[str, Any]] = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
}
#: LoRA adapters a worker keeps loaded; the least recently used is unloaded beyond this.
LORA_CACHE_SIZE = 8

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ModelError(ValueError):
    """The model cannot be used: the message names the model and the fix."""


def resolve_model_dir(name: str, *, endpoint_url: str | None = None) -> Path:
    """Turn ``--model`` into a local diffusers folder (downloading an s3:// one once per node)."""
    if name.startswith("s3://"):
        from sdbatch.storage import fetch_model_dir

        return fetch_model_dir(name, endpoint_url=endpoint_url)
    try:
        return local_model_dir(name)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def _refuse_pickle_weights(folder: Path) -> None:
    weights = list(folder.rglob("*.safetensors"))
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not weights:
        names = ", ".join(str(p.relative_to(folder)) for p in pickles[:3])
        raise ModelError(
            f"model folder {folder} holds only pickle weights ({names}); sdbatch loads safetensors "
            "only. Convert with `pipe.save_pretrained(dir, safe_serialization=True)`."
        )


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
    fingerprint: str  # sha256 over the folder's configs and weights
    device: str
    dtype: str
    versions: dict[str, str]
    threads: int  # torch intra-op threads: on CPU, the reduction order and so the last bit depend on it
    family: str = "StableDiffusionPipeline"  # model_index.json _class_name

    @property
    def short_hash(self) -> str:
        """A1111-style 10-hex model hash."""
        return self.fingerprint[:10]


def _absent_components(pipeline_cls: type, folder: Path) -> dict[str, None]:
    """Components the folder leaves out or names as null (an SD3 folder without its T5
    encoder): passed as None, which the pipelines accept for them."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    return {name: None for name in expected if not (index.get(name) or [None])[0]}


class LoraCache:
    """The job's declared adapters (name -> path) and those loaded into the pipeline, least
    recently used first. An adapter is read, checked (safetensors only) and loaded at most
    once while it stays among the ``LORA_CACHE_SIZE`` most recently used."""

    def __init__(self, pipe: DiffusionPipeline, declared: dict[str, str], endpoint_url: str | None):
        self.pipe = pipe
        self.declared = dict(declared)
        self.endpoint_url = endpoint_url
        self.sha256: dict[str, str] = {}  # of every adapter read so far
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.active: LoraSet | None = None  # None: nothing set yet

    def _load(self, name: str) -> None:
        from safetensors.torch import load as load_safetensors

        if name not in self.declared:
            raise ModelError(f"LoRA {name!r} is not declared for this job (declared: {', '.join(self.declared) or 'none'})")
        data = read_uri(self.declared[name], endpoint_url=self.endpoint_url)
        check_safetensors(data, f"{name}={self.declared[name]}")
        self.sha256[name] = sha256_hex(data)
        self.pipe.load_lora_weights(load_safetensors(data), adapter_name=name)
        log.info("loaded LoRA %s (sha256 %s)", name, self.sha256[name][:10])

    @torch.inference_mode()  # adapters load as inference tensors; toggling them must stay in that mode
    def use(self, loras: LoraSet) -> None:
        """Make ``loras`` the pipeline's active adapters (none: adapters disabled)."""
        if loras == self.active:
            return
        for name, _ in loras:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= LORA_CACHE_SIZE:
                evicted, _ = self.loaded.popitem(last=False)
                self.pipe.delete_adapters(evicted)
            self._load(name)
            self.loaded[name] = None
        if loras:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
        elif self.loaded:
            self.pipe.disable_lora()
        self.active = loras

    def record(self, loras: LoraSet) -> list[dict[str, Any]]:
        """Each adapter's name, scale and sha256, for the image record and the index."""
        return [{"name": n, "scale": s, "sha256": self.sha256.get(n)} for n, s in loras]


@dataclass
class _Tokenizers:
    """The text encoders' tokenizers, to say where a prompt is cut off."""

    tokenizers: list[Any] = field(default_factory=list)

    def truncated_at(self, prompt: str) -> int | None:
        """The character offset where the first text encoder to stop reading stops (None: all read)."""
        cuts = []
        for tok in self.tokenizers:
            limit = int(tok.model_max_length) - 2  # start and end tokens
            try:
                enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
            except NotImplementedError:  # a tokenizer without offsets: where its kept tokens' text ends
                ids = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"]
                if len(ids) > limit:
                    cuts.append(len(tok.decode(ids[:limit])))
                continue
            if len(enc["input_ids"]) > limit:
                cuts.append(int(enc["offset_mapping"][limit][0]))
        return min(cuts) if cuts else None


class Generator:
    """One loaded model replica: the family's text-to-image pipeline and an img2img pipeline
    that shares its modules, a per-call scheduler built from the model's own scheduler config,
    and the job's LoRA adapters."""

    def __init__(self, txt2img: DiffusionPipeline, info: ModelInfo, family: Family,
                 loras: dict[str, str] | None = None, endpoint_url: str | None = None):
        self.txt2img = txt2img
        self.img2img = getattr(diffusers, family.img2img).from_pipe(txt2img)
        self.family = family
        self.info = info
        self.loras = LoraCache(txt2img, loras or {}, endpoint_url)
        self._tokenizers = _Tokenizers([t for t in (getattr(txt2img, "tokenizer", None), getattr(txt2img, "tokenizer_2", None)) if t is not None])
        self._scheduler_config = dict(txt2img.scheduler.config)
        self._own_scheduler = type(txt2img.scheduler)
        self._sampler_configs: dict[str, dict[str, Any]] = {}
        # SD3's img2img renders at its native size unless told the (init image's) row size
        self._img2img_takes_size = "height" in inspect.signature(self.img2img.__call__).parameters
        for pipe in (self.txt2img, self.img2img):
            pipe.set_progress_bar_config(disable=True)

    @classmethod
    def load(
        cls,
        model: str = "builtin:shapes",
        *,
        device: str = "auto",
        dtype: str = "auto",
        endpoint_url: str | None = None,
        loras: dict[str, str] | None = None,
    ) -> Generator:
        folder = resolve_model_dir(model, endpoint_url=endpoint_url)
        _refuse_pickle_weights(folder)
        try:
            family = local_traits(folder).family
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        device = pick_device(device)
        torch_dtype = pick_dtype(dtype, device)
        pipeline_cls = getattr(diffusers, family.txt2img)
        try:
            pipe = pipeline_cls.from_pretrained(
                folder,
                dtype=torch_dtype,
                use_safetensors=True,
                local_files_only=True,
                **{**_absent_components(pipeline_cls, folder), **LOAD_OPTIONS.get(family.class_name, {})},
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"model {model!r} could not be loaded from {folder}: {exc}") from exc
        pipe = pipe.to(device)
        info = ModelInfo(
            name=model,
            fingerprint=fingerprint_model_dir(folder),
            device=device,
            dtype=str(torch_dtype).removeprefix("torch."),
            versions=software_versions(),
            threads=torch.get_num_threads(),
            family=family.class_name,
        )
        log.info("loaded %s model %s on %s (%s), fingerprint %s", family.name, model, device, info.dtype, info.short_hash)
        return cls(pipe, info, family, loras=loras, endpoint_url=endpoint_url)

    def make_scheduler(self, name: str):
        if name not in self.family.samplers:
            raise ModelError(f"scheduler {name!r} is not one of the {self.family.name} family's: {', '.join(self.family.samplers)}")
        if name == DEFAULT_SAMPLER:
            return self._own_scheduler.from_config(self._scheduler_config)
        scheduler_cls, overrides = SCHEDULER_FACTORIES[name]
        return scheduler_cls.from_config({**self._scheduler_config, **overrides})

    def scheduler_config(self, name: str) -> dict[str, Any]:
        """The full config of the sampler as used, for the metadata record (built once per
        name: every image's record needs it, and building a scheduler costs milliseconds)."""
        if name not in self._sampler_configs:
            self._sampler_configs[name] = dict(self.make_scheduler(name).config)
        return self._sampler_configs[name]

    def conditioning(self, row: Row) -> dict[str, Any]:
        """The family's extra per-row conditioning, as passed to the pipeline and recorded:
        SDXL's size micro-conditioning is the row's own size, uncropped."""
        if not self.family.size_conditioning:
            return {}
        size = (row.height, row.width)
        return {"original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}

    def prompt_truncated_at(self, prompt: str) -> int | None:
        return self._tokenizers.truncated_at(prompt)

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
            **self.conditioning(first),
        )
        self.loras.use(first.loras)
        pipe = self.img2img if first.is_img2img else self.txt2img
        pipe.scheduler = self.make_scheduler(first.scheduler)
        if first.is_img2img:
            if init_images is None or len(init_images) != len(rows) or any(i is None for i in init_images):
                raise ValueError("img2img rows need one init image each")
            images = [resize_for_row(img, first.width, first.height) for img in init_images]
            size = dict(height=first.height, width=first.width) if self._img2img_takes_size else {}
            result = pipe(image=images, strength=first.strength, **size, **common)
        else:
            result = pipe(height=first.height, width=first.width, **common)
        return list(result.images)
