"""``sdbatch submit``: its arguments parsed into a ``job.preflight.SubmitRequest``, the use case
(``sdbatch.job``) called step by step, and what each step returns printed."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional, cast

import typer

from sdbatch.cli.app import (
    EndpointOpt,
    LiteralPromptsOpt,
    SetOpt,
    SpecOpt,
    StrictOpt,
    command,
    err,
    fail,
    setup_logging,
    stdout,
    use_endpoint,
)
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
                          default=typer.Option(None, cast(str, c.flag), help=c.description or f"Default {c.name} for rows without a value."))
        for c in flagged
    ]
    with_flags.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what typer reads
    with_flags.__annotations__ = {p.name: p.annotation for p in params}
    return with_flags


@command(resumable=True)
@with_row_default_flags
def submit(
    manifest: str = typer.Argument(..., help="Parquet manifest: a file, a directory of .parquet files, a glob or s3:// URI."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output location: a local directory or s3://bucket/prefix (default: the spec's "
        "output.location, else ./sdbatch-out/<manifest stem>/)."),
    spec_path: Optional[Path] = SpecOpt,
    sets: list[str] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", help="builtin:shapes (default), a diffusers folder, s3://…, or a single-file "
        ".safetensors checkpoint (with --model-config)."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="For a single-file checkpoint: the diffusers folder (local or s3://) "
        "of its architecture, giving its configuration and the components the file lacks (model.config)."),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="An SDXL refiner folder (local or s3://) that finishes each row's last steps "
        "(model.refiner; SDXL bases; see --refiner-switch)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="A local diffusers VAE folder of the model's VAE class, used in place of its "
        "own (model.vae; AUTOMATIC1111's sd_vae); pinned with the model."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Model replicas (Ray actors)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="GPUs per worker (0 = CPU, default; 1 on GPU nodes; 0.5 packs two "
        "per GPU)."),
    speed: Optional[str] = typer.Option(None, "--speed", help="Speed profile: exact (default: bit-reproducible), fast (regional "
        "torch.compile, CUDA graphs, fused QKV, fp8/int8 where the GPU has it) or fastest (fast plus a step cache); "
        "single switches with --set speed.NAME=VALUE (see `sdbatch spec`)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per GPU batch (default 8)."),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Rows per shard, the unit of commit and retry (default 64)."),
    lora: list[str] = typer.Option([], "--lora", help="Declare a LoRA rows may use: --lora NAME=PATH (.safetensors, local or s3://; repeatable)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Job seed: rows without a seed derive theirs from it and their id."),
    output_format: Optional[str] = typer.Option(None, "--format", help="files (default) or webdataset."),
    image_format: Optional[str] = typer.Option(None, "--image-format", help="png (default), webp or jpeg."),
    dedup_within: Optional[str] = typer.Option(None, "--dedup-within", help="A label column: only images with the same value of it "
        "can be duplicates (scoring.dedup_within; distances: scoring.duplicate_max_distance, duplicate_colour_max_distance)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Existing Ray cluster; default: start a local one."),
    s3_endpoint: Optional[str] = EndpointOpt,
    deadline: Optional[str] = typer.Option(None, "--deadline", help="Start no shard at or after HH:MM or a duration (90m, 2h); running shards finish, "
        "the rest wait for a rerun (exit 4)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also regenerate rows that failed permanently in an earlier run."),
    repair: bool = typer.Option(False, "--repair", help="Also regenerate the rows `sdbatch verify` flags (image missing, or not matching its recorded "
        "sha256), through the normal commit path."),
    new_run: bool = typer.Option(False, "--new-run", help="Start over: delete the job OUT holds (only the objects its commits and index name, and its "
        "_sdbatch state; no other file) and run this one there."),
    allow_unauthenticated_ray: bool = typer.Option(False, "--allow-unauthenticated-ray", help="Start the local Ray cluster even with "
        "RAY_AUTH_MODE=disabled (it still listens on 127.0.0.1 only)."),
    strict: bool = StrictOpt,
    literal_prompts: bool = LiteralPromptsOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, preflight storage and model, and print the plan (shards, batches, fill ratio, "
        "estimate); write nothing. Exit 0, or 2 if a real submit would be refused."),
    notify: Optional[str] = typer.Option(None, "--notify", envvar="SDBATCH_NOTIFY", help="POST a JSON notification (state, rows, failures, report URL) to "
        "this webhook URL when the job ends, however it ends; a token in the URL is never logged."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    row_defaults: dict[str, Any] | None = None,  # --steps, --width, ...: see with_row_default_flags
) -> None:
    """Validate MANIFEST, then generate every row's image into OUT (resuming what OUT holds),
    and write OUT/report.html at the end. SIGTERM (``ray job stop``, ``kill``) stops like Ctrl-C."""
    setup_logging(verbose)
    use_endpoint(s3_endpoint)
    from sdbatch.job.notify import check_notify_url, notifying

    with notifying(None if dry_run or notify is None else check_notify_url(notify)) as end:
        from sdbatch.job.preflight import SubmitRequest, load_settings, prepare, validate
        from sdbatch.run.progress import local_time, plural

        request = SubmitRequest(
            manifest=manifest, out=out, spec_path=spec_path, sets=sets,
            overrides={
                "model.name": model,
                "model.config": model_config,
                "model.refiner": refiner,
                "model.vae": vae,
                "model.prompt_syntax": "literal" if literal_prompts else None,
                "resources.workers": workers,
                "resources.gpus_per_worker": gpus_per_worker,
                "resources.batch_size": batch_size,
                "resources.rows_per_shard": rows_per_shard,
                "speed.profile": speed,
                **(row_defaults or {}),
                "seed": seed,
                "output.format": output_format,
                "output.image_format": image_format,
                "scoring.dedup_within": dedup_within,
            },
            loras=lora, address=address, endpoint_url=s3_endpoint,
            deadline_at=parse_deadline(deadline) if deadline else None, retry_failed=retry_failed,
            repair=repair, new_run=new_run, allow_unauthenticated_ray=allow_unauthenticated_ray, strict=strict,
            literal_prompts=literal_prompts,
        )
        settings = load_settings(request)
        end.out = settings.out
        stdout.print(f"output → {settings.out}" + ("  (dry run: nothing is written)" if dry_run else ""))
        if request.deadline_at is not None:  # say which moment "06:30" became: it may be tomorrow's
            err.print(f"deadline: no shard starts at or after {local_time(request.deadline_at)}", highlight=False)
        validated = validate(request, settings)
        if validated.refusal:
            err.print(validated.report.render(), markup=False)
            raise BadInput(validated.refusal)
        for warning in validated.report.warnings:
            err.print(f"warning: {warning}", markup=False)
        prepared = prepare(validated)
        if dry_run:
            from sdbatch.job.dry_run import plan_job

            plan = plan_job(prepared)
            stdout.print(plan.render(), markup=False)
            if plan.refused:
                raise typer.Exit(EXIT_BAD_INPUT)
            return
        from sdbatch.job.submit import submit as run_submit

        result = run_submit(prepared)
        outcome = result.run
        end.out, end.report_url, end.message = prepared.storage.url, result.report_url, outcome.message
        end.rows = {"total": outcome.rows_total, "generated": outcome.rows_generated, "failed": outcome.rows_failed}
        end.failures = {"rows": outcome.rows_failed, "shards": outcome.shards_failed}
        if outcome.rows_generated == 0 and outcome.message:
            stdout.print(outcome.message)
        stdout.print(
            f"{outcome.rows_generated} images generated this run ({outcome.rows_failed} rows failed, "
            f"{plural(outcome.shards_skipped, 'shard')} already committed) in {result.wall_seconds:.1f} s, "
            f"{result.images_per_second:.2f} images/s, batches {outcome.batch_fill:.0%} full → {prepared.storage.url}"
        )
        if result.report_url:
            stdout.print(f"report → {result.report_url}")
        if outcome.exit_code:
            raise fail(outcome.message, outcome.exit_code)
