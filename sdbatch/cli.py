"""The ``sdbatch`` command line: typer commands and the one error printer, no logic of its own.

Every command is registered through ``command``: a documented condition (an ``SdbatchError``)
is printed as ``error: …`` and exits with its class's code (``sdbatch.errors``); Ctrl-C and
SIGTERM exit 130; anything else is a bug (traceback, exit 1). ``--help``, ``validate`` and
``status`` never import torch.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import re
import signal
import sys
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path
from collections.abc import Callable
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup
from rich.console import Console

from sdbatch import manifest_cli
from sdbatch.data.columns import DEFAULTED
from sdbatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    READER_EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_SHARDS_FAILED,
    RESUME_HINT,
    BadInput,
    SdbatchError,
)

class _PlainFlags:
    """``--help`` shows a flag as ``--strict``, not ``--strict <bool>``: a flag takes no value
    (typer gives every option a type column; an empty metavar leaves it blank)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class FlagsCommand(_PlainFlags, TyperCommand):
    pass


class FlagsGroup(_PlainFlags, TyperGroup):
    pass


app = typer.Typer(
    name="sdbatch",
    cls=FlagsGroup,
    help="Distributed, resumable, reproducible batch image generation for Stable Diffusion on Ray.",
    epilog="Examples: sdbatch validate manifest.parquet · sdbatch submit manifest.parquet --out out/cats --workers 2 · "
    "sdbatch status out/cats · sdbatch verify out/cats",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a line longer than the terminal (or 80 columns, off a terminal) is never broken
# mid-sentence by rich — logs and scripts read whole lines
err = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        import sdbatch

        typer.echo(f"sdbatch {sdbatch.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Options of every command."""

SpecOpt = typer.Option(None, "--spec", help="Job spec YAML (see `sdbatch spec --schema`, jobs/example-full.yaml).")
SetOpt = typer.Option([], "--set", help="Override a spec key: --set resources.batch_size=16 (repeatable).")
EndpointOpt = typer.Option(
    None, "--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL (MinIO, Ceph, R2, moto)."
)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "filelock", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # "connection pool is full": a pool size, not a problem


def use_endpoint(endpoint_url: str | None) -> None:
    """``--s3-endpoint`` means the same as ``AWS_ENDPOINT_URL``: set it for every client in
    this process (boto3 and pyarrow's S3 filesystem alike)."""
    from sdbatch.storage.base import check_uri

    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = check_uri(endpoint_url, "--s3-endpoint")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """The one error printer: ``error: MESSAGE`` on stderr, then exit with ``code``."""
    err.print("[bold red]error:[/] ", end="")
    err.print(message, markup=False)
    return typer.Exit(code)


def command(name: str | None = None, *, resumable: bool = False, epilog: str = EXIT_CODES_HELP) -> Callable:
    """Register a command on ``app`` whose documented errors go through ``fail``. For a
    ``resumable`` command (one that drives a job), failures that leave the job resumable say so."""
    def register(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except SdbatchError as exc:
                hint = f"; {RESUME_HINT}" if resumable and exc.exit_code >= EXIT_SHARDS_FAILED else ""
                raise fail(f"{exc}{hint}", exc.exit_code) from None
            except KeyboardInterrupt:
                raise fail(f"interrupted; {RESUME_HINT}" if resumable else "interrupted", EXIT_INTERRUPTED) from None

        return app.command(name, epilog=epilog, cls=FlagsCommand)(run)

    return register


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
    from sdbatch.manifest import open_manifest, validate_manifest
    from sdbatch.progress import local_time, plural
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
    report = validate_manifest(source, spec, strict=strict, family=traits.family)
    if not report.ok:
        err.print(report.render(), markup=False)
        raise BadInput(f"manifest {manifest} has {report.issue_count} invalid values; nothing was written to {out}")
    for warning in report.warnings:
        err.print(f"warning: {warning}", markup=False)
    from sdbatch.manifest import check_init_image_roots

    check_init_image_roots(source, spec, [out, spec.model.name])
    preflight_error = preflight_samplers(report.summary["schedulers"]) or preflight_clip_model(spec.scoring.clip_model, s3_endpoint)
    if preflight_error:
        raise BadInput(preflight_error)
    local_ray_environment(address, allow_unauthenticated_ray)
    from sdbatch.output import job_record

    storage = open_storage(
        out, endpoint_url=s3_endpoint, max_attempts=spec.retries.storage_attempts,
        max_pool_connections=spec.resources.upload_threads,
    )
    job = job_record(spec, source, model_ref.pin, lora_sha256, refiner_ref.pin if refiner_ref else None)
    if dry_run:
        from sdbatch.dry_run import check_output, plan_job

        check_output(storage)
        plan = plan_job(spec, source, storage, job, new_run=new_run, endpoint_url=s3_endpoint)
        stdout.print(plan.render(), markup=False)
        if plan.refused:
            raise typer.Exit(EXIT_BAD_INPUT)
        return
    storage.check_access()

    from sdbatch.scheduler import run_job

    t0 = time.monotonic()
    outcome = run_job(
        spec, source, storage, job, address=address, endpoint_url=s3_endpoint, deadline=deadline_at,
        retry_failed=retry_failed, repair=repair, new_run=new_run,
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
    from sdbatch.report import write_report_quietly

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


@command()
def status(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    s3_endpoint: Optional[str] = EndpointOpt,
    as_json: bool = typer.Option(False, "--json", help="Print state, row counts, ETA, per-worker rates and the raw snapshots as JSON (for monitors)."),
) -> None:
    """Show a job's progress, read from its output location alone (works from any machine)."""
    import json

    from sdbatch.documents import JOB_KEY, LOCK_KEY, JobRecord, Progress, Success, read_json
    from sdbatch.lock import lock_is_stale
    from sdbatch.output import committed_shards, failed_rows_text
    from sdbatch.policy import failed_shard_text
    from sdbatch.progress import eta_text
    from sdbatch.storage.base import NotFound
    from sdbatch.storage.open import open_storage

    storage = open_storage(out_location, endpoint_url=s3_endpoint)
    job = JobRecord.read(storage)
    if job is None:
        raise BadInput(f"no sdbatch job at {out_location} (no {JOB_KEY})")
    # a state file that cannot be read is said, not fatal: status shows what the others tell
    unreadable: list[str] = []
    progress = _readable(Progress.read, storage, unreadable)
    success = _readable(Success.read, storage, unreadable)
    lock = _readable(lambda s: read_json(s, LOCK_KEY), storage, unreadable)
    try:
        lock_age = storage.age(LOCK_KEY) if lock is not None else 0.0
    except NotFound:  # released meanwhile
        lock, lock_age = None, 0.0
    committed = len(committed_shards(storage))
    total = job.manifest.num_rows
    # the plan needs the manifest; its driver wrote it
    shards_total = progress.shards_total if progress is not None and progress.shards_total is not None else "?"
    state = "finished" if success else progress.state if progress else "unknown" if unreadable else "not started"
    driver_alive = lock is not None and not lock_is_stale(lock, lock_age)
    if state == "running" and not driver_alive:  # progress.json's last word came from a driver that died
        state = "interrupted (no driver is running it; run the same command to resume)"
    if as_json:
        # report.html charts the history; monitors want the current numbers
        snapshot = progress.model_dump(mode="json", exclude={"history"}) if progress else {}
        if success:
            rows = {"rows_done": success.rows_ok, "rows_failed": success.rows_failed, "rows_remaining": 0}
        elif progress:
            rows = {"rows_done": progress.rows_done, "rows_failed": progress.rows_failed_this_run,
                    "rows_remaining": progress.rows_remaining}
        else:
            rows = {"rows_done": 0, "rows_failed": 0, "rows_remaining": total}
        stdout.print_json(json.dumps({
            "state": state, "rows_total": total, **rows,
            "images_per_second": progress.images_per_second if progress else None,
            "eta_seconds": progress.eta_seconds if progress and not success else None,
            "per_worker": snapshot.get("per_worker", {}),
            "shards_committed": committed, "shards_total": shards_total,
            "driver": lock, "driver_alive": driver_alive, "progress": snapshot,
            "success": success.model_dump(mode="json") if success else None,
            "unreadable": unreadable,
        }))
        return
    stdout.print(f"job        {job.fingerprint}  ({job.manifest.source}, {total} rows)")
    stdout.print(f"state      {state}")
    if lock is not None:
        who = f"host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {lock_age:.0f} s ago"
        stdout.print(f"driver     {who}" if driver_alive else f"driver     gone ({who}; its lease has expired)")
    stdout.print(f"shards     {committed}/{shards_total} committed")
    if progress:
        stdout.print(f"rows       {progress.rows_done}/{progress.rows_total} done, "
                     f"{progress.rows_failed_this_run} failed this run")
        stdout.print(f"speed      {progress.images_per_second} images/s, {eta_text(progress.eta_seconds)}")
        stdout.print(f"updated    {progress.updated_at}")
        for failed in progress.failed_shards:
            stdout.print(f"failed     shard {failed_shard_text(failed.model_dump())}", markup=False)
    if success:
        stdout.print(f"result     {success.rows_ok} ok, {success.rows_failed} failed, finished {success.finished_at}")
        if success.failed_rows:
            stdout.print("failed rows (first ones; all in index.parquet, status=failed):")
            stdout.print(failed_rows_text(success.failed_rows), markup=False)
    for problem in unreadable:
        stdout.print(f"unreadable {problem}", markup=False)


def _readable(read: Callable[[Any], Any], storage: Any, unreadable: list[str]) -> Any:
    """``read(storage)``, or None with the reason added to ``unreadable`` when the state file
    is corrupt (``CorruptState``: its message names the file and the recovery)."""
    from sdbatch.documents import CorruptState

    try:
        return read(storage)
    except CorruptState as exc:
        unreadable.append(str(exc))
        return None


@command(epilog="Exit codes: 0 the lock was removed (or there was none); 2 a driver may still hold it, or OUT is unreadable.")
def unlock(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    force: bool = typer.Option(False, "--force", help="Remove the lock even if its driver may be alive (you checked it is not)."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Remove OUT's job lock left by a driver that died, once no driver can be alive: on the
    same host its process must be gone, elsewhere its lease (60 s after its last heartbeat)
    must have expired — or pass --force.

    Example: sdbatch unlock s3://bucket/runs/cats"""
    from sdbatch.lock import break_lock
    from sdbatch.storage.open import open_storage

    held = break_lock(open_storage(out_location, endpoint_url=s3_endpoint), force=force)
    if held is None:
        stdout.print(f"no lock on {out_location}: nothing to do")
    else:
        stdout.print(f"removed the lock of driver {held.get('driver', '?')} (host {held.get('host', '?')}, "
                     f"pid {held.get('pid', '?')}) on {out_location}")


@command(epilog="")
def reproduce(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    row_id: str = typer.Argument(..., metavar="ID", help="The row id (the `id` column of the index)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the regenerated image here."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of its recorded location (its fingerprint is still checked)."),
    s3_endpoint: Optional[str] = EndpointOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Regenerate one image from OUT's metadata alone and compare its bytes with the stored one.

    Exit codes: 0 the bytes match; 1 they differ (the largest pixel difference is printed);
    2 bad input (no job at OUT, unknown ID, a row that cannot be rebuilt)."""
    setup_logging(verbose)
    from sdbatch.audit import AuditError, Reproducer, open_job

    job_output = open_job(out_location, endpoint_url=s3_endpoint)
    reproducer = Reproducer(job_output, endpoint_url=s3_endpoint, model=model)
    if row_id not in reproducer.by_id:
        raise AuditError(f"no row with id {row_id!r} in the index of {out_location} ({job_output.index_source})")
    err.print(f"regenerating {row_id} …", highlight=False)
    try:
        result = reproducer.reproduce(row_id)
    except ValueError as exc:  # the recorded model cannot be loaded (models raise ValueError)
        raise BadInput(f"cannot reproduce {row_id}: {exc}") from None
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}")
    if output is not None:
        output.write_bytes(result.data)
    batch = f"batch {result.batch_id}: {len(result.batch_rows)} rows" + ("" if result.batch_rebuilt else " (NOT the recorded batch)")
    stdout.print(f"{result.key}  ({batch}; record from the {'stored image' if result.record_source == 'image' else 'index'})")
    stdout.print(result.summary())
    if output is not None:
        stdout.print(f"wrote {output}")
    if not result.match:
        raise typer.Exit(1)


@command(epilog="")
def verify(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    regenerate: int = typer.Option(0, "--regenerate", min=0, help="Also regenerate K random ok rows and report drift."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for choosing the rows to regenerate (default: random, printed)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --regenerate: load the model from here instead of its recorded location."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="First rewrite a finished job's missing, corrupt or incomplete index.parquet from its commits."),
    s3_endpoint: Optional[str] = EndpointOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Check the index against job.json, the manifest and the commits, and that every index row's
    object exists with its recorded size and sha256; list orphans.

    Orphans (objects under images/ or shards/ that no committed index row names) are reported
    but are not an error: readers trust the index, never a listing. Exit codes: 0 clean;
    1 objects missing, mismatched or foreign, the index incomplete, or regenerated rows drifted; 2 no job at OUT."""
    setup_logging(verbose)
    from sdbatch.audit import verify as run_verify

    report = run_verify(out_location, regenerate=regenerate, seed=seed, endpoint_url=s3_endpoint, model=model,
                        rebuild_index=rebuild_index,
                        progress=lambda msg: err.print(msg, highlight=False) if verbose else None)
    stdout.print(report.render(), markup=False)
    if not report.clean:
        raise typer.Exit(1)


@command()
def report(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    gpu_hour_usd: Optional[float] = typer.Option(None, "--gpu-hour-usd", min=0, help="Price of one GPU-hour (default: the job's report.gpu_hour_usd)."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """(Re)write OUT/report.html: summary, throughput chart, workers, failures, contact sheet."""
    from sdbatch.report import write_report
    from sdbatch.storage.open import open_storage

    stdout.print(f"report → {write_report(open_storage(out_location, endpoint_url=s3_endpoint), gpu_hour_usd)}")


@command(epilog=READER_EXIT_CODES_HELP)
def export(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    to: str = typer.Option(..., "--to", help="hf (a Hugging Face imagefolder: datasets.load_dataset(DIR)) or webdataset."),
    dest: Path = typer.Argument(..., metavar="DIR", help="A new (or empty) local directory to write."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over the index columns, e.g. \"not blank and duplicate_of is null\"."),
    shard_size: int = typer.Option(1 << 30, "--shard-size", min=1, help="webdataset: bytes per tar shard."),
    skip_mismatched: bool = typer.Option(False, "--skip-mismatched", help="Leave out rows whose stored image is not the one the index recorded (size, sha256) instead of refusing the export; they are named in a warning."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Write OUT's images and index rows (all columns), filtered by --where, in a training format.

    Every image copied is checked against its index row's size and sha256."""
    setup_logging(False)
    from sdbatch.export import export as run_export
    from sdbatch.storage.open import open_storage

    count = run_export(open_storage(out_location, endpoint_url=s3_endpoint), to, dest, where, shard_size,
                       skip_mismatched)
    stdout.print(f"exported {count} images to {dest} ({to})")


@command(epilog=READER_EXIT_CODES_HELP)
def stats(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Counts per label column, failed, blank and duplicate rows, and score distributions of OUT's index."""
    import json

    from sdbatch.export import load_index
    from sdbatch.stats import job_stats, render
    from sdbatch.storage.open import open_storage

    index, final, _ = load_index(open_storage(out_location, endpoint_url=s3_endpoint))
    result = job_stats(index, final)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        stdout.print(render(result), markup=False)


@command(epilog=READER_EXIT_CODES_HELP)
def grid(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    dest: Path = typer.Option(..., "--output", "-o", help="Local directory for the grid images."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Draw one labelled X/Y grid image per prompt of a job built with `sdbatch manifest --grid`."""
    setup_logging(False)
    from sdbatch.export import load_index
    from sdbatch.grid import render_grids
    from sdbatch.storage.open import open_storage

    index, _, layout = load_index(open_storage(out_location, endpoint_url=s3_endpoint))
    paths = render_grids(index, layout, dest)
    stdout.print(f"wrote {len(paths)} grid images to {dest}")


command("validate", epilog="")(manifest_cli.validate)
command("manifest", epilog="")(manifest_cli.manifest)
command("spec", epilog="")(manifest_cli.spec)


def main() -> None:
    """Run the CLI, then leave through ``os._exit`` after the atexit handlers (Ray shutdown,
    logging) have run. Skipping interpreter finalisation matters: pyarrow's native thread pools
    can abort a process that is being torn down ("terminate called without an active
    exception", apache/arrow#34314), which would turn a finished command's exit code into -6."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM is an interruption, like Ctrl-C
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException:  # noqa: BLE001 - an unexpected crash still gets its traceback and a clean exit
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    """What the interpreter would make of ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
