"""The submit use case's first steps, before anything is written: the request (the CLI's
arguments as a value), the job's settings (spec with the flags applied, OUT), validation
(model and refiner preflight, LoRA hashes, the manifest checked against the spec and the
model's family) and the preflight that ends in a ``PreparedJob`` (init-image roots, samplers,
CLIP model, the local Ray environment, OUT opened, the job record). Torch-free; a real submit
and ``--dry-run`` go through the same steps."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdbatch.data.loras import LoraError, parse_declaration
from sdbatch.data.samplers import SAMPLERS
from sdbatch.errors import BadInput
from sdbatch.manifest.init_roots import check_init_image_roots
from sdbatch.manifest.report import ValidationReport
from sdbatch.manifest.sources import Manifest, open_manifest
from sdbatch.manifest.validate import validate_manifest
from sdbatch.models.builtin import local_model_dir
from sdbatch.models.errors import ModelError
from sdbatch.models.lora_keys import ModelModules, describe_misfits, lora_misfits, safetensors_shapes
from sdbatch.models.pins import check_safetensors, sha256_hex
from sdbatch.models.quantized import check_loadable, gpu_only
from sdbatch.models.resolve import ModelRef, preflight
from sdbatch.output.claim import job_record
from sdbatch.output.documents import CorruptState, JobRecord
from sdbatch.spec import JobSpec, load_spec
from sdbatch.storage.base import NotFound, Storage, StorageError, check_uri
from sdbatch.storage.locations import is_s3
from sdbatch.storage.open import open_storage, read_uri


@dataclass(frozen=True)
class SubmitRequest:
    """What ``sdbatch submit`` was asked, parsed but not yet checked."""

    manifest: str
    out: str | None
    spec_path: Path | None
    sets: list[str]
    overrides: dict[str, Any]  # spec key -> flag value (None: the flag was not given)
    loras: list[str]  # --lora NAME=PATH declarations
    address: str | None
    endpoint_url: str | None
    deadline_at: float | None  # epoch seconds
    retry_failed: bool = False
    repair: bool = False
    new_run: bool = False
    allow_unauthenticated_ray: bool = False
    strict: bool = False
    literal_prompts: bool = False  # no AUTOMATIC1111 prompt-syntax checks (--literal-prompts)


@dataclass(frozen=True)
class Settings:
    """The spec with the flags and declared LoRAs applied, and the output location."""

    spec: JobSpec
    out: str


@dataclass(frozen=True)
class Validated:
    """The checked model (and refiner), LoRA hashes and the manifest's validation report."""

    request: SubmitRequest
    spec: JobSpec  # sized for the model's native resolution
    out: str
    model: ModelRef
    refiner: ModelRef | None
    lora_sha256: dict[str, str]
    source: Manifest
    report: ValidationReport

    @property
    def refusal(self) -> str | None:
        """Why the manifest is refused (its report says which values), or None."""
        if self.report.ok:
            return None
        return f"manifest {self.request.manifest} has {self.report.issue_count} invalid values; nothing was written to {self.out}"


@dataclass(frozen=True)
class PreparedJob:
    """Everything a submit or its dry run needs, found without writing anything."""

    request: SubmitRequest
    spec: JobSpec
    model: ModelRef
    source: Manifest
    storage: Storage
    job: JobRecord


def load_settings(request: SubmitRequest) -> Settings:
    declared = dict(parse_declaration(item) for item in request.loras)
    spec = load_spec(request.spec_path, request.sets, {**request.overrides, **{f"loras.{n}": p for n, p in declared.items()}})
    return Settings(spec, check_uri(request.out or spec.output.location or default_out(request.manifest), "--out"))


def validate(request: SubmitRequest, settings: Settings) -> Validated:
    """Preflight the model and the refiner (pickles, family, native size, pin, pre-quantized
    weights the workers can load: torch-free),
    hash the LoRAs, and validate the manifest against the spec and the model's family."""
    spec = settings.spec
    model = preflight_model(spec.model.name, request.endpoint_url, config=spec.model.config, vae=spec.model.vae,
                            embeddings=spec.embeddings, controlnets=spec.controlnets,
                            ip_adapter=spec.ip_adapter.files if spec.ip_adapter else None)
    traits = model.traits
    assert traits is not None  # None only for a refiner
    if spec.model.text_encoder_device != "same" and traits.family.runtime != "diffusers":
        raise ModelError(f"model.text_encoder_device={spec.model.text_encoder_device}: model {spec.model.name!r} is a "
                         f"{traits.family.name} model, which has no text encoder; remove model.text_encoder_device")
    kept_on_cpu = [q for q in gpu_only(model.quantized) if q.component.startswith("text_encoder")]
    if spec.model.text_encoder_device == "cpu" and kept_on_cpu:
        raise ModelError(f"model {spec.model.name!r}: its {kept_on_cpu[0].component} ({kept_on_cpu[0].how}) loads on a "
                         "CUDA GPU only, and model.text_encoder_device=cpu would keep it on the CPU: set "
                         "model.text_encoder_device=same, or save that text encoder unquantized or with torchao")
    no_gpu = spec.resources.gpus_per_worker == 0 or spec.model.device == "cpu"
    why_no_gpu = ("this job's workers have none (resources.gpus_per_worker="
                  f"{spec.resources.gpus_per_worker:g}, model.device={spec.model.device})" if no_gpu else None)
    check_loadable(spec.model.name, model.quantized, why_no_gpu)
    refiner = preflight_model(spec.model.refiner, request.endpoint_url, refiner_of=traits.family) if spec.model.refiner else None
    if refiner is not None:  # a pre-quantized refiner, as the model
        check_loadable(refiner.name, refiner.quantized, why_no_gpu)
    spec = spec.with_model_defaults(traits)
    lora_sha256 = adapter_hashes(spec.loras, request.endpoint_url, model_modules(spec), spec.model.name)
    source = open_manifest(request.manifest)
    report = validated_at_claim(request, spec, settings.out, source, job_record(
        spec, source, model.pin, lora_sha256, refiner.pin if refiner else None,
    )) or validate_manifest(source, spec, strict=request.strict, model=traits,
                                    literal_prompts=request.literal_prompts)
    return Validated(request, spec, settings.out, model, refiner, lora_sha256, source, report)


def validated_at_claim(request: SubmitRequest, spec: JobSpec, out: str, source: Manifest,
                       job: JobRecord) -> ValidationReport | None:
    """A resume's manifest is not validated again (at 10,000,000 rows that is minutes before
    the first new shard): when OUT's job record carries this job's fingerprint — the same
    manifest content (its files' pins), settings, model, refiner and LoRAs — written by this
    sdbatch version, the manifest passed this validation when the job was claimed. The report
    then holds what ``prepare`` needs: the samplers' rows, known without reading rows only when
    the manifest has no ``scheduler`` column (else, and with ``--strict``, None: validate)."""
    if request.strict or "scheduler" in source.columns:
        return None
    try:
        existing = JobRecord.read(open_storage(out, endpoint_url=request.endpoint_url))
    except (StorageError, CorruptState):  # unreadable here: the full path reports it
        return None
    if existing is None or existing.fingerprint != job.fingerprint or existing.sdbatch_version != job.sdbatch_version:
        return None
    logging.getLogger("sdbatch.cli").info("resuming %s: its manifest was validated when the job was claimed (%s); "
                                          "its rows are not read again", out, existing.created_at)
    return ValidationReport(num_rows=source.num_rows, summary={
        "source": source.source, "files": len(source.files), "fingerprint": source.fingerprint, "rows": source.num_rows,
        "schedulers": {spec.defaults.scheduler: source.num_rows}, "validated_at_claim": existing.created_at,
    })


def prepare(validated: Validated) -> PreparedJob:
    """The checks after validation (init-image roots, samplers, CLIP model, the local Ray
    environment), OUT opened (nothing written) and the job record. BadInput naming the problem."""
    if validated.refusal:
        raise BadInput(validated.refusal)
    request, spec, source = validated.request, validated.spec, validated.source
    check_init_image_roots(source, spec, [validated.out, spec.model.name])
    problem = (preflight_samplers(validated.report.summary["schedulers"]) or preflight_dedup_within(spec, source)
               or preflight_clip_model(spec.scoring.clip_model, request.endpoint_url))
    if problem:
        raise BadInput(problem)
    local_ray_environment(request.address, request.allow_unauthenticated_ray)
    storage = open_storage(
        validated.out, endpoint_url=request.endpoint_url, max_attempts=spec.retries.storage_attempts,
        max_pool_connections=spec.resources.upload_threads,
    )
    refiner_pin = validated.refiner.pin if validated.refiner else None
    job = job_record(spec, source, validated.model.pin, validated.lora_sha256, refiner_pin)
    return PreparedJob(request, spec, validated.model, source, storage, job)


def model_modules(spec: JobSpec) -> ModelModules | None:
    """The model's modules that declared LoRAs are checked against: a local diffusers folder's
    (an ``s3://`` model, a single-file checkpoint or a folder without weights: None, left to
    the loader)."""
    if not spec.loras or spec.model.config is not None or is_s3(spec.model.name):
        return None
    modules = ModelModules(local_model_dir(spec.model.name))
    return modules if modules.components() else None  # builtin:null: no weights to compare with


def adapter_hashes(declared: dict[str, str], endpoint_url: str | None, model: ModelModules | None = None,
                   model_name: str = "") -> dict[str, str]:
    """sha256 of each declared LoRA (read once here: the job fingerprint covers them), after
    checking it is a safetensors file and, ``model`` given, that its keys fit the model
    (``models.lora_keys``); LoraError naming the adapter (and the model)."""
    hashes = {}
    for name, path in sorted(declared.items()):
        try:
            data = read_uri(path, endpoint_url=endpoint_url)
        except (NotFound, OSError) as exc:
            raise LoraError(f"LoRA {name}={path}: cannot be read ({exc})") from None
        check_safetensors(data, f"{name}={path}")
        problems = lora_misfits(safetensors_shapes(data), model) if model is not None else []
        if problems:
            raise LoraError(f"LoRA {name}={path} does not fit model {model_name!r} "
                            f"({describe_misfits(problems)}). Fix: use a LoRA trained for this model's architecture "
                            "(an SD 1.x LoRA fits SD 1.x models only, an SDXL one SDXL), or drop it from the job; "
                            "nothing was written")
        hashes[name] = sha256_hex(data)
    return hashes


def local_ray_environment(address: str | None, allow_unauthenticated: bool) -> None:
    """Prepare the local Ray cluster sdbatch starts when no ``--address``/``RAY_ADDRESS`` is
    given (before ray is imported): every process of it, dashboard and agents included, gets
    127.0.0.1 as its node IP, and Ray binds its servers to the node IP. ``ray.init`` alone turns
    ``_node_ip_address="127.0.0.1"`` into the host's address on Linux; Ray's
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-machine mode, inherited by every process
    the cluster starts) keeps it loopback. Token authentication is asked for explicitly
    (``RAY_AUTH_MODE=token``, Ray's default made explicit): Ray then generates the token if
    there is none and does not warn the user that it turned it on. BadInput when
    authentication is disabled and the user did not opt in."""
    if address or os.environ.get("RAY_ADDRESS"):
        return
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled" and not allow_unauthenticated:
        raise BadInput("RAY_AUTH_MODE=disabled: the local Ray cluster would accept commands from any process on this "
                "machine without a token. Unset RAY_AUTH_MODE (token authentication is Ray's default), or pass "
                "--allow-unauthenticated-ray if that is really wanted; nothing was written")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
        logging.getLogger("sdbatch.cli").debug("the local Ray cluster uses token authentication (RAY_AUTH_MODE=token)")


def preflight_samplers(used: dict[str, int]) -> str | None:
    """The Python packages the manifest's samplers need (``lms``: scipy) are installed (no import)."""
    for name, rows in used.items():
        needs = SAMPLERS[name].requires if name in SAMPLERS else ()  # "default": the model's own, loaded with it
        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            return (f"the {name!r} sampler ({rows:,} rows) needs the Python package {', '.join(missing)}, which is not "
                    f"installed: pip install {' '.join(missing)} (or reinstall sdbatch, which declares it); nothing was written")
    return None


def default_out(manifest: str) -> str:
    """``./sdbatch-out/<manifest stem>/``: a glob's or directory's stem is its last plain part.
    Never inside a local directory manifest (``submit .``): then beside it, so no rerun reads
    the job's own output as manifest files."""
    stem = Path(manifest.rstrip("/").split("?")[0]).stem.rstrip("*") or "manifest"
    out = Path("sdbatch-out") / stem
    folder = Path(manifest).resolve()
    if folder.is_dir() and out.resolve().is_relative_to(folder):
        out = folder.parent / "sdbatch-out" / folder.name
    return str(out)


def preflight_model(name: str, endpoint_url: str | None, refiner_of=None, config: str | None = None,
                    vae: str | None = None, embeddings: dict[str, str] | None = None,
                    controlnets: dict[str, str] | None = None, ip_adapter: tuple[str, str] | None = None) -> ModelRef:
    """Check the model (or the refiner of a base of family ``refiner_of``) before any worker
    starts (pickles, family; no torch import) and pin it (``sdbatch.models.resolve.preflight``)."""
    try:
        return preflight(name, endpoint_url=endpoint_url, refiner_of=refiner_of, config=config, vae=vae,
                         embeddings=embeddings, controlnets=controlnets, ip_adapter=ip_adapter)
    except StorageError as exc:
        raise BadInput(f"model {name!r}: {exc}") from None


def preflight_dedup_within(spec: JobSpec, source: Manifest) -> str | None:
    """Check ``scoring.dedup_within`` names a label column of the manifest."""
    within = spec.scoring.dedup_within
    if within is None or within in source.passthrough_columns:
        return None
    labels = ", ".join(source.passthrough_columns) or "none"
    return (f"--dedup-within / scoring.dedup_within {within!r} is not a label column of the manifest "
            f"(its label columns: {labels}); name one of them, or leave it out to compare all images")


def preflight_clip_model(location: str | None, endpoint_url: str | None) -> str | None:
    """Check ``scoring.clip_model`` names a transformers folder before any worker starts."""
    if location is None:
        return None
    fix = "; set scoring.clip_model to a folder written by CLIPModel.save_pretrained (config.json + model.safetensors)"
    try:
        found = open_storage(location, endpoint_url=endpoint_url).exists("config.json")
    except StorageError as exc:
        return f"scoring.clip_model {location!r}: {exc}"
    return None if found else f"scoring.clip_model {location!r}: no config.json there{fix}"
