"""The typed job spec: what to generate with, where to, on what resources, within what limits.

A spec comes from (in increasing precedence) the built-in defaults, a YAML file
(``--spec job.yaml``), ``--set dotted.key=value`` overrides and the ordinary CLI flags.
Every section forbids unknown keys so a typo is an error, not a silently ignored setting.

The job *fingerprint* hashes exactly the settings that change what images are produced and
where rows land (model, per-row defaults, job seed, batching, output format); a resumed job
must have the same fingerprint as the one that started OUT.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from sdbatch.data.columns import DEFAULTED, fingerprint_defaults, suggest
from sdbatch.data.loras import LoraError, parse_declaration
from sdbatch.data.samplers import SCHEDULERS, sampler_name
from sdbatch.errors import BadInput
from sdbatch.models.families import ModelTraits
from sdbatch.models.families.base import MODEL_DEFAULTED
from sdbatch.models.speed import SpeedSpec
from sdbatch.storage.locations import is_s3


class SpecError(BadInput, ValueError):
    """A job spec that cannot be used; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    name: str = Field(
        "builtin:shapes",
        description="builtin:NAME, a local diffusers folder, or an s3:// prefix holding one",
    )
    refiner: str | None = Field(
        None,
        description="an SDXL refiner folder (StableDiffusionXLImg2ImgPipeline; local or s3://) that finishes each "
        "row's last steps after the base, from the row's refiner_switch (ensemble of experts); SDXL bases only",
    )
    config: str | None = Field(
        None,
        description="for a single-file checkpoint as model.name (a .safetensors file as AUTOMATIC1111/ComfyUI/Civitai "
        "keep them: a whole SD/SDXL pipeline, or a FLUX/SD3 transformer; or a GGUF-quantized .gguf transformer of "
        "FLUX.1, Qwen-Image or Z-Image, with the gguf package installed): the diffusers folder (local or s3://) of "
        "the same architecture giving its configuration and every component the file lacks",
    )
    vae: str | None = Field(
        None,
        description="a local diffusers VAE folder (AutoencoderKL.save_pretrained: config.json + safetensors) of the "
        "model's VAE class, loaded in place of the model's own (AUTOMATIC1111's sd_vae); pinned with the model",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when the worker has a GPU, else cpu"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on cuda, float32 on cpu"
    )
    compile: bool = Field(
        False, description="torch.compile the UNet (warmed up per batch shape; recorded, as it can change the low bits)"
    )
    offload: Literal["none", "model", "group"] = Field(
        "none",
        description="for models larger than one GPU (FLUX.1 in bf16 on a 24-48 GB card, Qwen-Image, FLUX.2 [dev]): "
        "model = diffusers' model CPU offload (each component moved to the GPU while it runs), group = group offload "
        "(layers streamed to the GPU as they run: least GPU memory, slowest); CUDA only, recorded in job.json",
    )

    text_encoder_device: Literal["same", "cpu"] = Field(
        "same",
        description="cpu = keep the text encoders (FLUX.2 [dev]'s 24B Mistral-3, Qwen-Image's 7B Qwen2.5-VL, T5) in "
        "host memory and encode prompts there, each distinct prompt once, its embeddings moved to the GPU: the GPU "
        "holds the denoiser and VAE alone; same = on model.device. Recorded (versions.text_encoder_device) and in "
        "the job fingerprint: embeddings computed on another device can differ in the low bits",
    )

    prompt_syntax: Literal["a1111", "literal"] = Field(
        "a1111",
        description="a1111 = AUTOMATIC1111 emphasis (word:1.3), (word), [word], BREAK and prompts longer than 75 "
        "tokens (in 75-token chunks) read through compel for CLIP-encoder models (SD 1.x/2.x, SDXL, SD3); literal = "
        "every prompt is text as written, cut at the encoder's limit (--literal-prompts)",
    )

    @model_validator(mode="after")
    def _single_file_has_a_config(self) -> ModelSpec:
        """A single-file checkpoint needs model.config, and only it takes one; a pickle
        checkpoint is refused by its name before anything reads it."""
        from sdbatch.models.errors import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, pickle_checkpoint_fix

        if self.name.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"model.name {self.name!r} is {pickle_checkpoint_fix(self.name)}")
        single = self.name.lower().endswith(SINGLE_FILE_SUFFIXES)
        if single and self.config is None:
            raise ValueError(f"model.name {self.name!r} is a single-file checkpoint: set model.config (--model-config) to "
                             "a diffusers folder of the same architecture (e.g. the base model saved with save_pretrained) "
                             "for its configuration and the components the file lacks")
        if self.config is not None and not single:
            raise ValueError(f"model.config is only for a single-file .safetensors or .gguf checkpoint as model.name; {self.name!r} "
                             "is a folder: remove model.config")
        return self

    @model_validator(mode="after")
    def _offload_needs_a_gpu(self) -> ModelSpec:
        if self.offload != "none" and self.device == "cpu":
            raise ValueError(f"model.offload={self.offload} moves weights between CPU and GPU memory, and model.device is cpu: "
                             "set model.device=cuda (or auto on GPU workers), or model.offload=none")
        if self.offload != "none" and self.text_encoder_device != "same":
            raise ValueError(f"model.offload={self.offload} already moves the text encoders between CPU and GPU memory as "
                             f"they run, so model.text_encoder_device={self.text_encoder_device} would fight it: keep one "
                             "(model.text_encoder_device=same, or model.offload=none)")
        return self

    @property
    def configs_at(self) -> str:
        """Where the model's configs are read: its folder, or a single file's model.config."""
        return self.config or self.name


def _known_scheduler(value: Any) -> Any:  # RowDefaults.scheduler, made at run time
    name = sampler_name(value) if isinstance(value, str) else value  # AUTOMATIC1111's names too
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {value!r} is not supported; use one of {', '.join(SCHEDULERS)} "
                         "(or AUTOMATIC1111's name, e.g. 'DPM++ 2M Karras')")
    return name


#: Values for every per-row manifest column a row leaves empty or the manifest lacks: one
#: field per column of the column table that has a default.
if TYPE_CHECKING:  # the model is made at run time from the column table: to mypy it is Any
    RowDefaults = Any
else:
    RowDefaults = create_model(
        "RowDefaults",
        __base__=_Section,
        __doc__="Values for every per-row manifest column a row leaves empty or the manifest lacks.",
        __validators__={"_known_scheduler": field_validator("scheduler", mode="before")(_known_scheduler)},
        **{c.name: (c.spec_type, Field(c.default, description=c.description or None, **c.spec_bounds))
           for c in DEFAULTED},
    )


class OutputSpec(_Section):
    location: str | None = Field(
        None, description="where `sdbatch submit` writes when --out is not given (default ./sdbatch-out/<manifest stem>/)",
    )
    format: Literal["files", "webdataset"] = "files"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    png_compress_level: int = Field(1, ge=0, le=9, description="1 = fast; 9 = smallest")
    quality: int = Field(95, ge=1, le=100, description="webp/jpeg quality")


class ResourcesSpec(_Section):
    workers: int = Field(1, ge=1, description="model replicas (Ray actors)")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    batch_size: int = Field(8, ge=1, le=1024)
    rows_per_shard: int = Field(64, ge=1, le=1_000_000)
    upload_threads: int = Field(4, ge=1, le=64)
    init_images_in_memory: int | None = Field(
        None, ge=1,
        description="decoded init images a worker holds at once: the batch generating and those read ahead "
        "(one batch ahead needs 2 × batch_size); default 2 × batch_size; at least batch_size",
    )

    autoscaler_wait_s: float = Field(
        600, ge=0,
        description="on a cluster with an autoscaler, how long to wait for it to add what the workers need "
        "before starting fewer of them (or refusing, if not one fits)",
    )

    @model_validator(mode="after")
    def _room_for_one_batch(self) -> ResourcesSpec:
        if self.init_images_in_memory is not None and self.init_images_in_memory < self.batch_size:
            raise ValueError(f"resources.init_images_in_memory ({self.init_images_in_memory}) must be at least "
                             f"resources.batch_size ({self.batch_size}): one batch's init images are held together")
        return self

    @property
    def init_image_limit(self) -> int:
        return self.init_images_in_memory or 2 * self.batch_size


class RetrySpec(_Section):
    shard_attempts: int = Field(3, ge=1, description="attempts per shard before it is reported failed")
    storage_attempts: int = Field(5, ge=1, description="botocore attempts per S3 request")
    hang_timeout_s: float | None = Field(
        None, gt=0,
        description="a shard with no batch finished for this long is hung and its worker replaced; "
        "default: 10 × the slowest batch measured so far, at least 300 s",
    )
    load_timeout_s: float = Field(
        1800, gt=0,
        description="a worker that has not loaded the model this long after it started is hung: it is replaced "
        "(a failed start: the job gives up after 6); sized for a large model read from object storage",
    )


class ReportSpec(_Section):
    gpu_hour_usd: float | None = Field(
        None, ge=0, description="price of one GPU-hour (one worker-hour on CPU workers): report.html adds the cost per 1,000 images",
    )
    contact_sheet_images: int = Field(24, ge=0, le=500, description="sample of images shown in report.html")


class ScoringSpec(_Section):
    """The quality columns of the index (``sdbatch.quality``) and the optional CLIP score."""

    clip_model: str | None = Field(
        None,
        description="a transformers CLIP folder (local or s3://, safetensors) to add clip_score, the prompt-image "
        "agreement, per image; e.g. openai/clip-vit-large-patch14 saved with save_pretrained",
    )
    blank_max_std: float = Field(
        2.0, ge=0, description="an image whose luminance standard deviation (0-255) is at most this is flagged blank"
    )
    duplicate_max_distance: int = Field(
        0, ge=0, le=16,
        description="images whose phashes differ in at most this many bits (and colour hashes as "
        "duplicate_colour_max_distance allows) are duplicates (0: identical phash); each bit more compares more pairs at merge",
    )
    duplicate_colour_max_distance: int = Field(
        0, ge=0, le=42,
        description="and whose colour hashes (42 bits: the share of the image in each hue and greyness bin) differ in at "
        "most this many bits (0: identical), so a green and a red triangle of the same seed are not duplicates",
    )
    dedup_within: str | None = Field(
        None, description="a manifest label column: only images with the same value of it are compared for duplicates "
        "(e.g. label, so images of different classes are never duplicates)",
    )


class LimitsSpec(_Section):
    max_prompt_chars: int = Field(4000, ge=1)
    max_steps: int = Field(200, ge=1)
    max_width: int = Field(2048, ge=64)
    max_height: int = Field(2048, ge=64)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="width*height budget per image, and per init image")
    max_init_image_bytes: int = Field(
        64 * 2**20, ge=1, description="an init image file larger than this fails its row (read no further)"
    )
    max_guidance: float = Field(50.0, gt=0)
    max_errors_shown: int = Field(50, ge=1, description="bad rows listed by validate")
    max_columns: int = Field(
        1000, ge=1, description="manifest columns (per-row and passthrough labels): each is an index column and a key "
        "of every image's record, so a wider manifest is refused by validate")
    init_image_roots: list[str] = Field(
        [], description="folders or s3://bucket/prefix init images may also be read from, besides the manifest's "
        "folder and the buckets the job already uses")


class IPAdapterSpec(_Section):
    """The job's IP-Adapter (SD 1.x/2.x, SDXL): rows with an ``ip_adapter_image`` are conditioned
    on it through these weights; both are local (copy them to each node) and pinned by content
    with the model."""

    weights: str = Field(description="the IP-Adapter's .safetensors file (image_proj.* and ip_adapter.* tensors, "
                         "as h94/IP-Adapter ships them)")
    image_encoder: str = Field(description="its image encoder: a local transformers CLIPVisionModelWithProjection "
                               "folder (config.json and model.safetensors)")

    @field_validator("weights", "image_encoder")
    @classmethod
    def _local(cls, path: str, info: Any) -> str:
        """Local paths, made absolute (workers run elsewhere)."""
        if is_s3(path):
            raise ValueError(f"ip_adapter.{info.field_name}: {path}: a local path is loaded (copy it to each node)")
        if info.field_name == "weights" and not path.endswith(".safetensors"):
            raise ValueError(f"ip_adapter.weights: {path}: only a .safetensors file is loaded (pickle .bin files are "
                             "refused: convert with safetensors.torch.save_file)")
        return str(Path(path).expanduser().absolute())

    @property
    def files(self) -> tuple[str, str]:
        """(weights, image_encoder), as ``models`` loads them."""
        return self.weights, self.image_encoder


class JobSpec(_Section):
    seed: int = Field(0, ge=0, lt=2**63, description="job seed; rows without a seed derive theirs from it and the row id")
    model: ModelSpec = ModelSpec()
    defaults: RowDefaults = RowDefaults()
    output: OutputSpec = OutputSpec()
    resources: ResourcesSpec = ResourcesSpec()
    retries: RetrySpec = RetrySpec()
    scoring: ScoringSpec = ScoringSpec()
    limits: LimitsSpec = LimitsSpec()
    report: ReportSpec = ReportSpec()
    speed: SpeedSpec = SpeedSpec()
    loras: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters rows may use: NAME -> local path or s3:// URI of a .safetensors file",
    )

    embeddings: dict[str, str] = Field(
        default_factory=dict,
        description="textual-inversion embeddings (SD 1.x/2.x, SDXL): NAME -> local .safetensors file, named in "
        "prompts as <NAME> or embedding:NAME; pinned by content with the model",
    )

    controlnets: dict[str, str] = Field(
        default_factory=dict,
        description="ControlNet models rows may use (SD 1.x/2.x, SDXL, FLUX.1, SD3): NAME -> local diffusers ControlNet folder; a "
        "row names them in its controlnet column with its control_image; pinned by content with the model",
    )

    ip_adapter: IPAdapterSpec | None = Field(
        None, description="the IP-Adapter rows with an ip_adapter_image use (SD 1.x/2.x, SDXL): {weights: FILE.safetensors, "
        "image_encoder: FOLDER}; pinned by content with the model")

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments ``models.loading.load_request`` loads this job's model with, beside its name,
        pins and endpoint (``reproduce`` overrides the device, dtype and offloading it regenerates with)."""
        return dict(
            config=self.model.config, vae=self.model.vae, embeddings=self.embeddings, controlnets=self.controlnets,
            ip_adapter=self.ip_adapter.files if self.ip_adapter else None, device=self.model.device,
            dtype=self.model.dtype, loras=self.loras, compile=self.model.compile, refiner=self.model.refiner,
            offload=self.model.offload, text_encoder_device=self.model.text_encoder_device, speed=self.speed,
            prompt_syntax=self.model.prompt_syntax,
        )

    @field_validator("controlnets")
    @classmethod
    def _controlnets_declared_well(cls, controlnets: dict[str, str]) -> dict[str, str]:
        """Names as the controlnet column writes them, local folders, made absolute (workers run elsewhere)."""
        misnamed = [name for name in controlnets if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)]
        if misnamed:
            raise ValueError(f"controlnets: {misnamed[0]!r}: a name is 1-64 letters, digits, '_' and '-' (the controlnet "
                             "column writes NAME:SCALE)")
        remote = [f"{name}={path}" for name, path in controlnets.items() if is_s3(path)]
        if remote:
            raise ValueError(f"controlnets: {remote[0]}: a local diffusers ControlNet folder is loaded (copy it to each node)")
        return {name: str(Path(path).expanduser().absolute()) for name, path in controlnets.items()}

    @field_validator("embeddings")
    @classmethod
    def _embeddings_declared_well(cls, embeddings: dict[str, str]) -> dict[str, str]:
        """Names as LoRAs take them, local .safetensors files only, made absolute (workers run elsewhere)."""
        for name, path in embeddings.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"embeddings: {name!r}: a name is letters, digits, '_', '.' and '-' (it is written <{name}> "
                                 "in prompts)")
            if not path.endswith(".safetensors") or is_s3(path):
                raise ValueError(f"embeddings: {name}={path}: a local .safetensors file is loaded (pickle .pt/.bin "
                                 "embeddings are refused: convert with safetensors.torch.save_file)")
        return {name: str(Path(path).expanduser().absolute()) for name, path in embeddings.items()}

    @field_validator("loras")
    @classmethod
    def _loras_declared_well(cls, loras: dict[str, str]) -> dict[str, str]:
        """Names as --lora takes them, .safetensors files only; a local path is made absolute
        here, since workers run elsewhere (another cwd, another node's mount)."""
        for name, path in loras.items():
            try:
                parse_declaration(f"{name}={path}")
            except LoraError as exc:
                raise ValueError(str(exc).replace("--lora", "loras:")) from None
            if not path.endswith(".safetensors"):
                raise ValueError(f"loras: {name}={path}: only .safetensors files are loaded (pickle checkpoints are refused)")
        return {name: path if is_s3(path) else str(Path(path).expanduser().absolute())
                for name, path in loras.items()}

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> JobSpec:
        """Credentials belong in the environment: a URI carrying them is refused before it can
        reach a message or ``job.json`` (``storage.check_uri``)."""
        from sdbatch.storage.base import check_uri

        for key, uri in (("model.name", self.model.name), ("model.config", self.model.config),
                         ("model.refiner", self.model.refiner), ("model.vae", self.model.vae),
                         ("output.location", self.output.location), ("scoring.clip_model", self.scoring.clip_model),
                         *((f"loras.{name}", path) for name, path in self.loras.items()),
                         *((f"embeddings.{name}", path) for name, path in self.embeddings.items()),
                         *((f"controlnets.{name}", path) for name, path in self.controlnets.items()),
                         *((f"ip_adapter.{key}", path) for key, path in (self.ip_adapter.model_dump().items()
                                                                           if self.ip_adapter else ())),
                         *(("limits.init_image_roots", root) for root in self.limits.init_image_roots)):
            if uri:
                check_uri(uri, key)
        return self

    @model_validator(mode="after")
    def _speed_fits_the_workers(self) -> JobSpec:
        """What the speed section asks of the workers they can do (models.speed)."""
        if self.model.compile and self.speed.switches().regional_compile:
            raise ValueError("model.compile (the whole denoiser) and speed.regional_compile (its repeated blocks) "
                             "both compile it; keep one: set speed.regional_compile=false or model.compile=false")
        gpu_only = self.speed.gpu_only_set()
        if gpu_only and (self.resources.gpus_per_worker == 0 or self.model.device == "cpu"):
            raise ValueError(f"speed.{gpu_only[0]} needs a GPU, and this job's workers have none "
                             f"(resources.gpus_per_worker={self.resources.gpus_per_worker:g}, model.device={self.model.device}); "
                             "give workers a GPU (--gpus-per-worker 1), or leave the switch to the profile, which skips "
                             "it on a CPU and records that")
        return self

    @model_validator(mode="after")
    def _model_defaults_of_local_model(self) -> JobSpec:
        """A local or built-in model's native size and own defaults (``ModelTraits.defaults``:
        a distilled model's steps and guidance; ``ModelTraits.strength``) fill the defaults left
        null (an ``s3://`` model's are read at submit: ``with_model_defaults``). A folder that
        cannot be read is left for the model preflight to report."""
        if any(getattr(self.defaults, name) is None for name in (*MODEL_FILLED, "strength")) and not is_s3(self.model.configs_at):
            from sdbatch.models.builtin import local_model_dir
            from sdbatch.models.errors import FamilyError
            from sdbatch.models.families import local_traits

            try:
                traits = local_traits(local_model_dir(self.model.configs_at))
            except (FamilyError, ValueError, OSError):
                return self
            for name, value in model_defaults(traits).items():
                if getattr(self.defaults, name) is None:
                    setattr(self.defaults, name, value)
        return self

    def with_model_defaults(self, traits: ModelTraits) -> JobSpec:
        """This spec with the model's native size and own defaults for the defaults left null."""
        defaults = self.defaults.model_copy(update={
            name: value for name, value in model_defaults(traits).items() if getattr(self.defaults, name) is None})
        return self.model_copy(update={"defaults": defaults})

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that decide image bytes and row placement (not workers, retries...)."""
        return {
            "seed": self.seed,
            "model": self.model.name,
            **({"model_config": self.model.config} if self.model.config else {}),  # its pin: the model pin
            **({"refiner": self.model.refiner} if self.model.refiner else {}),  # its pin: output.job_record
            **({"vae": self.model.vae} if self.model.vae else {}),  # its pin: the model pin
            **({"embeddings": self.embeddings} if self.embeddings else {}),  # their sha256: the model pin
            **({"controlnets": self.controlnets} if self.controlnets else {}),  # their content: the model pin
            **({"ip_adapter": self.ip_adapter.model_dump()} if self.ip_adapter else {}),  # its content: the model pin
            "dtype": self.model.dtype,
            "compile": self.model.compile,
            # left out at its default, so jobs from before it keep their fingerprint
            **({"prompt_syntax": self.model.prompt_syntax} if self.model.prompt_syntax != "a1111" else {}),
            **({"text_encoder_device": self.model.text_encoder_device} if self.model.text_encoder_device != "same" else {}),
            # None for exact (left out, so jobs from before profiles keep their fingerprint)
            **({"speed": speed} if (speed := self.speed.fingerprint_value()) else {}),
            "defaults": fingerprint_defaults(self.defaults.model_dump()),
            "output": self.output.model_dump(exclude={"location"}),
            "batch_size": self.resources.batch_size,
            "rows_per_shard": self.resources.rows_per_shard,
            "planner": 2,  # 2: shards grouped by batch key (plan.make_plan); 1 was contiguous ranges
            # the worker writes these columns into each shard's commit (duplicates are redone at merge)
            "scoring": {"clip_model": self.scoring.clip_model, "blank_max_std": self.scoring.blank_max_std},
        }


#: The defaults a null stands for the model's own value: its native size and MODEL_DEFAULTED.
#: (``strength``'s null is the model's too, and stays null for a model that takes none.)
MODEL_FILLED = ("width", "height", *MODEL_DEFAULTED)


def model_defaults(traits: ModelTraits) -> dict[str, Any]:
    """The values of MODEL_FILLED that ``traits``' model gives, and its img2img strength
    (``ModelTraits.strength``: None for an instruction-edit model, so its rows take none)."""
    return {"width": traits.native_width, "height": traits.native_height,
            **{name: traits.defaults[name] for name in MODEL_DEFAULTED}, "strength": traits.strength}


def fingerprint(data: dict[str, Any]) -> str:
    """A stable short hash of JSON-serialisable data."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def spec_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the job spec (``defaults.steps``, ``resources.workers``, ...)."""
    keys = []
    for name, info in (model or JobSpec).model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys.extend(spec_keys(section, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest_key(dotted: str) -> str | None:
    """``defaults.stpes`` → ``defaults.steps``; ``stpes`` → ``defaults.steps``; ``defualts`` → ``defaults``."""
    keys = spec_keys()
    by_leaf: dict[str, str] = {}
    for key in keys:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], key)
    sections = {key.split(".", 1)[0] for key in keys if "." in key}
    leaf = suggest(dotted.rsplit(".", 1)[-1], by_leaf)
    section = suggest(dotted, sections) if "." not in dotted else None
    return suggest(dotted, keys) or (by_leaf[leaf] if leaf else None) or section


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid job spec ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = _closest_key(where)
            hint = f"did you mean `{close}`?" if close else "remove it or check its spelling"
            lines.append(f"  {where}: unknown key; {hint} (see `sdbatch spec --schema`)")
        else:
            lines.append(f"  {where}: {e['msg']} (got {_SHORT_REPR.repr(e.get('input'))})")
    return "\n".join(lines)


#: The repr of a value in a message: bounded however large or deep the value is.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 80, 80

#: YAML values a spec may hold once its aliases are followed: a real spec has a few hundred; an
#: alias bomb (nine aliases of nine aliases of …, 1 KB) would expand to billions.
MAX_YAML_VALUES = 10_000


def _expanded_values(node: yaml.Node, sizes: dict[int, float | None]) -> float:
    """How many values ``node`` holds with every alias followed (each shared node counted once
    per use, computed once); a node that holds itself is infinite."""
    if id(node) in sizes:
        size = sizes[id(node)]
        return float("inf") if size is None else size
    sizes[id(node)] = None  # being counted: meeting it again is a cycle
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
    size = 1 + sum(_expanded_values(child, sizes) for child in children)
    sizes[id(node)] = size
    return size


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load``, refusing a document whose aliases expand to more than
    ``MAX_YAML_VALUES`` values before anything is built from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_values(node, {}) > MAX_YAML_VALUES:
            raise SpecError(f"{where}: its YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; "
                            "write the values out, or use fewer aliases")
        return loader.construct_document(node)
    except (yaml.YAMLError, RecursionError) as exc:
        raise SpecError(f"{where} is not valid YAML: {exc if isinstance(exc, yaml.YAMLError) else 'nested too deeply'}") from None
    finally:
        loader.dispose()


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set_option(item: str) -> tuple[str, Any]:
    """``key.path=value`` with the value read as a YAML scalar (so 8 is an int, 7.5 a float)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set resources.batch_size=8")
    return key.strip(), load_yaml(raw, f"--set {item!r}: value") if raw.strip() else ""


def load_spec(
    path: str | Path | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> JobSpec:
    """Build a JobSpec from a YAML file, ``--set`` items and flag overrides (dotted keys)."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
        loaded = load_yaml(text, f"job spec {path}")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError(f"job spec {path} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in sets or []:
        _set_dotted(data, *parse_set_option(item))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    if sets or overrides:
        origin += " with command-line overrides"
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


def spec_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
