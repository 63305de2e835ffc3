"""``sdbatch submit``: its arguments, the preflight checks before any worker starts, the run."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import typer

from sdbatch.cli.app import EndpointOpt, SetOpt, SpecOpt, command, err, fail, setup_logging, stdout, use_endpoint
from sdbatch.data.columns import DEFAULTED
from sdbatch.errors import EXIT_BAD_INPUT, BadInput


def parse_deadline(text: str, now: datetime | None = None) -> float:
    """``HH:MM`` (next such clock time, local: one already past today means tomorrow) or a
    duration like ``90m``, ``2h30m``, ``45s``."""
    now = now or datetime.now()
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if clock:
        hour, minute = int(clock[1]), int(clock[2])
        if hour > 23 or minute > 59:
            raise BadInput(f"--deadline {text!r}: not a clock time (HH:MM, 00:00–23:59)")
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at <= now:
            at += timedelta(days=1)
        return at.timestamp()
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not parts or not any(parts.groups()):
        raise BadInput(f"--deadline {text!r}: use a clock time like 06:30 or a duration like 90m, 2h30m, 45s")
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return now.timestamp() + hours * 3600 + minutes * 60 + seconds


def with_row_default_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one option per column-table column that has a flag (``--steps``,
    ``--width``, ...); it receives them as ``row_defaults`` (``{"defaults.steps": 30, ...}``)."""
    flagged = [c for c in DEFAULTED if c.flag]

    @functools.wraps(command)
    def with_flags(**kwargs: Any) -> None:
        row_defaults = {f"defaults.{c.name}": kwargs.pop(c.name) for c in flagged}
        command(row_defaults=row_defaults, **kwargs)

    params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "row_defaults"]
    params += [
        inspect.Parameter(c.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[c.python_type],
                          default=typer.Option(None, c.flag, help=c.description or f"Default {c.name} for rows without a value."))
        for c in flagged
    ]
    with_flags.__signature__ = inspect.Signature(params)  # what typer reads
    with_flags.__annotations__ = {p.name: p.annotation for p in params}
    return with_flags


@command(resumable=True)
@with_row_default_flags
def submit(
    manifest: str = typer.Argument(..., help="Parquet manifest: a file, a directory of .parquet files, a glob or s3:// URI."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output location: a local directory or s3://bucket/prefix (default: the spec's output.location, else ./sdbatch-out/<manifest stem>/)."),
    spec_path: Optional[Path] = SpecOpt,
    sets: list[str] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", help="builtin:shapes (default), a diffusers folder, or s3://…"),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="An SDXL refiner folder (local or s3://) that finishes each row's last steps (model.refiner; SDXL bases; see --refiner-switch)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Model replicas (Ray actors)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="GPUs per worker (0 = CPU, default; 1 on GPU nodes; 0.5 packs two per GPU)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per GPU batch (default 8)."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Rows per shard, the unit of commit and retry (default 64)."),
    lora: list[str] = typer.Option([], "--lora", help="Declare a LoRA rows may use: --lora NAME=PATH (.safetensors, local or s3://; repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Job seed: rows without a seed derive theirs from it and their id."),
    output_format: Optional[str] = typer.Option(None, "--format", help="files (default) or webdataset."),
    image_format: Optional[str] = typer.Option(None, "--image-format", help="png (default), webp or jpeg."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Existing Ray cluster; default: start a local one."),
    s3_endpoint: Optional[str] = EndpointOpt,
    deadline: Optional[str] = typer.Option(None, "--deadline", help="Start no shard at or after HH:MM or a duration (90m, 2h); running shards finish, the rest wait for a rerun (exit 4)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also regenerate rows that failed permanently in an earlier run."),
    repair: bool = typer.Option(False, "--repair", help="Also regenerate the rows `sdbatch verify` flags (image missing, or not matching its recorded sha256), through the normal commit path."),
    new_run: bool = typer.Option(False, "--new-run", help="Start over: delete the job OUT holds (only the objects its commits and index name, and its _sdbatch state; no other file) and run this one there."),
    allow_unauthenticated_ray: bool = typer.Option(False, "--allow-unauthenticated-ray", help="Start the local Ray cluster even with RAY_AUTH_MODE=disabled (it still listens on 127.0.0.1 only)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse columns named like a misspelled per-row column (widht, promt) instead of warning."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, preflight storage and model, and print the plan (shards, batches, fill ratio, estimate); write nothing. Exit 0, or 2 if a real submit would be refused."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    row_defaults: dict[str, Any] | None = None,  # --steps, --width, ...: see with_row_default_flags
) -> None:
    """Validate MANIFEST, then generate every row's image into OUT (resuming what OUT holds),
    and write OUT/report.html at the end. SIGTERM (``ray job stop``, ``kill``) stops like Ctrl-C."""
    setup_logging(verbose)
    use_endpoint(s3_endpoint)
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.manifest.validate import validate_manifest
    from sdbatch.run.progress import local_time, plural
    from sdbatch.spec import load_spec
    from sdbatch.storage.base import check_uri
    from sdbatch.storage.open import open_storage

    overrides: dict[str, Any] = {
        "model.name": model,
        "model.refiner": refiner,
        "resources.workers": workers,
        "resources.gpus_per_worker": gpus_per_worker,
        "resources.batch_size": batch_size,
        "resources.rows_per_shard": rows_per_shard,
        **(row_defaults or {}),
        "seed": seed,
        "output.format": output_format,
        "output.image_format": image_format,
    }
    from sdbatch.data.loras import parse_declaration

    declared = dict(parse_declaration(item) for item in lora)
    spec = load_spec(spec_path, sets, {**overrides, **{f"loras.{n}": p for n, p in declared.items()}})
    deadline_at = parse_deadline(deadline) if deadline else None
    out = check_uri(out or spec.output.location or default_out(manifest), "--out")
    stdout.print(f"output → {out}" + ("  (dry run: nothing is written)" if dry_run else ""))
    if deadline_at is not None:  # say which moment "06:30" became: it may be tomorrow's
        err.print(f"deadline: no shard starts at or after {local_time(deadline_at)}", highlight=False)
    model_ref = preflight_model(spec.model.name, s3_endpoint)  # pickles, family, native size, pin: torch-free
    traits = model_ref.traits
    refiner_ref = preflight_model(spec.model.refiner, s3_endpoint, refiner_of=traits.family) if spec.model.refiner else None
    spec = spec.with_native_size(traits)
    lora_sha256 = adapter_hashes(spec.loras, s3_endpoint)
    source = open_manifest(manifest)
    report = validate_manifest(source, spec, strict=strict, model=traits)
    if not report.ok:
        err.print(report.render(), markup=False)
        raise BadInput(f"manifest {manifest} has {report.issue_count} invalid values; nothing was written to {out}")
    for warning in report.warnings:
        err.print(f"warning: {warning}", markup=False)
    from sdbatch.manifest.init_roots import check_init_image_roots

    check_init_image_roots(source, spec, [out, spec.model.name])
    preflight_error = preflight_samplers(report.summary["schedulers"]) or preflight_clip_model(spec.scoring.clip_model, s3_endpoint)
    if preflight_error:
        raise BadInput(preflight_error)
    local_ray_environment(address, allow_unauthenticated_ray)
    from sdbatch.output.claim import job_record

    storage = open_storage(
        out, endpoint_url=s3_endpoint, max_attempts=spec.retries.storage_attempts,
        max_pool_connections=spec.resources.upload_threads,
    )
    job = job_record(spec, source, model_ref.pin, lora_sha256, refiner_ref.pin if refiner_ref else None)
    if dry_run:
        from sdbatch.job.dry_run import check_output, plan_job

        check_output(storage)
        plan = plan_job(spec, source, storage, job, new_run=new_run, endpoint_url=s3_endpoint)
        stdout.print(plan.render(), markup=False)
        if plan.refused:
            raise typer.Exit(EXIT_BAD_INPUT)
        return
    storage.check_access()

    from sdbatch.job.repair import repair_rows
    from sdbatch.run.driver import run_job

    t0 = time.monotonic()
    outcome = run_job(
        spec, source, storage, job, address=address, endpoint_url=s3_endpoint, deadline=deadline_at,
        retry_failed=retry_failed, repair=repair_rows if repair else None, new_run=new_run,
    )
    wall = time.monotonic() - t0
    if outcome.rows_generated == 0 and outcome.message:
        stdout.print(outcome.message)
    rate = outcome.rows_generated / wall if wall > 0 else 0.0
    stdout.print(
        f"{outcome.rows_generated} images generated this run ({outcome.rows_failed} rows failed, "
        f"{plural(outcome.shards_skipped, 'shard')} already committed) in {wall:.1f} s, {rate:.2f} images/s, "
        f"batches {outcome.batch_fill:.0%} full → {storage.url}"
    )
    from sdbatch.audit.report import write_report_quietly

    report_url = write_report_quietly(storage)
    if report_url:
        stdout.print(f"report → {report_url}")
    if outcome.exit_code:
        raise fail(outcome.message, outcome.exit_code)


def adapter_hashes(declared: dict[str, str], endpoint_url: str | None) -> dict[str, str]:
    """sha256 of each declared LoRA (read once here: the job fingerprint covers them), after
    checking it is a safetensors file; LoraError naming the adapter."""
    from sdbatch.data.loras import LoraError
    from sdbatch.models.pins import check_safetensors, sha256_hex
    from sdbatch.storage.base import NotFound
    from sdbatch.storage.open import read_uri

    hashes = {}
    for name, path in sorted(declared.items()):
        try:
            data = read_uri(path, endpoint_url=endpoint_url)
        except (NotFound, OSError) as exc:
            raise LoraError(f"LoRA {name}={path}: cannot be read ({exc})") from None
        check_safetensors(data, f"{name}={path}")
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
    import importlib.util

    from sdbatch.data.samplers import SAMPLERS

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


def preflight_model(name: str, endpoint_url: str | None, refiner_of=None):
    """Check the model (or the refiner of a base of family ``refiner_of``) before any worker
    starts (pickles, family; no torch import) and pin it (``sdbatch.models.preflight``): its ModelRef."""
    from sdbatch.models.resolve import preflight
    from sdbatch.storage.base import StorageError

    try:
        return preflight(name, endpoint_url=endpoint_url, refiner_of=refiner_of)
    except StorageError as exc:
        raise BadInput(f"model {name!r}: {exc}") from None


def preflight_clip_model(location: str | None, endpoint_url: str | None) -> str | None:
    """Check ``scoring.clip_model`` names a transformers folder before any worker starts."""
    if location is None:
        return None
    fix = "; set scoring.clip_model to a folder written by CLIPModel.save_pretrained (config.json + model.safetensors)"
    from sdbatch.storage.base import StorageError
    from sdbatch.storage.open import open_storage

    try:
        found = open_storage(location, endpoint_url=endpoint_url).exists("config.json")
    except StorageError as exc:
        return f"scoring.clip_model {location!r}: {exc}"
    return None if found else f"scoring.clip_model {location!r}: no config.json there{fix}"
