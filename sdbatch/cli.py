"""The ``sdbatch`` command line: typer commands, exit codes, no logic of its own.

Exit codes: 0 done; 2 bad input (manifest, spec, model, output location, lock held);
3 finished but some rows failed permanently; 4 stopped at --deadline (resumable);
5 some shards failed on every attempt, or the storage failed (resumable); 130 interrupted
(resumable). ``--help``, ``validate`` and ``status`` never import torch.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from sdbatch import manifest_cli

app = typer.Typer(
    name="sdbatch",
    help="Distributed, resumable, reproducible batch image generation for Stable Diffusion on Ray.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad input (manifest, spec, model, --out, lock held); "
    "3 finished, some rows failed (rerun with --retry-failed); 4 stopped at --deadline (rerun to resume); "
    "5 some shards failed on every attempt, or the storage failed (rerun to retry); 130 interrupted (rerun to resume)."
)

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
    for noisy in ("botocore", "boto3", "urllib3", "filelock", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def use_endpoint(endpoint_url: str | None) -> None:
    """``--s3-endpoint`` means the same as ``AWS_ENDPOINT_URL``: set it for every client in
    this process (boto3 and pyarrow's S3 filesystem alike)."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def parse_deadline(text: str, now: datetime | None = None) -> float:
    """``HH:MM`` (next such clock time, local) or a duration like ``90m``, ``2h30m``, ``45s``."""
    now = now or datetime.now()
    clock = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if clock:
        hour, minute = int(clock[1]), int(clock[2])
        if hour > 23 or minute > 59:
            raise ValueError(f"--deadline {text!r}: not a clock time (HH:MM, 00:00–23:59)")
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at <= now:
            at += timedelta(days=1)
        return at.timestamp()
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not parts or not any(parts.groups()):
        raise ValueError(f"--deadline {text!r}: use a clock time like 06:30 or a duration like 90m, 2h30m, 45s")
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return now.timestamp() + hours * 3600 + minutes * 60 + seconds


@app.command(epilog=EXIT_CODES_HELP)
def submit(
    manifest: str = typer.Argument(..., help="Parquet manifest: a file, a directory of .parquet files, a glob or s3:// URI."),
    out: str = typer.Option(..., "--out", "-o", help="Output location: a local directory or s3://bucket/prefix."),
    spec_path: Optional[Path] = SpecOpt,
    sets: list[str] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", help="builtin:shapes (default), a diffusers folder, or s3://…"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Model replicas (Ray actors)."),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Default steps for rows without a value."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale"),
    width: Optional[int] = typer.Option(None, "--width"),
    height: Optional[int] = typer.Option(None, "--height"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Job seed: rows without a seed derive theirs from it and their id."),
    output_format: Optional[str] = typer.Option(None, "--format", help="files (default) or webdataset."),
    image_format: Optional[str] = typer.Option(None, "--image-format", help="png (default), webp or jpeg."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Existing Ray cluster; default: start a local one."),
    s3_endpoint: Optional[str] = EndpointOpt,
    deadline: Optional[str] = typer.Option(None, "--deadline", help="Start no shard at or after HH:MM or a duration (90m, 2h); running shards finish, the rest wait for a rerun (exit 4)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also regenerate rows that failed permanently in an earlier run."),
    new_run: bool = typer.Option(False, "--new-run", help="Start over: delete the job OUT holds (only the objects its commits and index name, and its _sdbatch state; no other file) and run this one there."),
    allow_unauthenticated_ray: bool = typer.Option(False, "--allow-unauthenticated-ray", help="Start the local Ray cluster even with RAY_AUTH_MODE=disabled (it still listens on 127.0.0.1 only)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Validate MANIFEST, then generate every row's image into OUT (resuming what OUT holds)."""
    setup_logging(verbose)
    use_endpoint(s3_endpoint)
    from sdbatch.manifest import ManifestError, open_manifest, validate_manifest
    from sdbatch.spec import SpecError, load_spec
    from sdbatch.storage import StorageConfigError, StorageError, open_storage

    overrides: dict[str, Any] = {
        "model.name": model,
        "resources.workers": workers,
        "resources.gpus_per_worker": gpus_per_worker,
        "resources.batch_size": batch_size,
        "resources.rows_per_shard": rows_per_shard,
        "defaults.steps": steps,
        "defaults.guidance_scale": guidance_scale,
        "defaults.width": width,
        "defaults.height": height,
        "defaults.scheduler": scheduler,
        "seed": seed,
        "output.format": output_format,
        "output.image_format": image_format,
    }
    try:
        spec = load_spec(spec_path, sets, overrides)
        deadline_at = parse_deadline(deadline) if deadline else None
    except (SpecError, ValueError) as exc:
        raise fail(str(exc)) from None
    try:
        source = open_manifest(manifest)
        report = validate_manifest(source, spec)
    except ManifestError as exc:
        raise fail(str(exc)) from None
    if not report.ok:
        err.print(report.render(), soft_wrap=True, markup=False)
        raise fail(f"manifest {manifest} has {report.issue_count} invalid values; nothing was written to {out}")
    from sdbatch.manifest import check_init_image_roots
    from sdbatch.models import ModelError, preflight

    try:
        check_init_image_roots(source, spec, [out, spec.model.name])
        model_ref = preflight(spec.model.name, endpoint_url=s3_endpoint)
    except (ManifestError, ModelError) as exc:
        raise fail(str(exc)) from None
    except StorageError as exc:
        raise fail(f"model {spec.model.name!r}: {exc}") from None
    clip_error = preflight_clip_model(spec.scoring.clip_model, s3_endpoint)
    if clip_error:
        raise fail(clip_error)
    ray_error = local_ray_environment(address, allow_unauthenticated_ray)
    if ray_error:
        raise fail(ray_error)
    try:
        storage = open_storage(
            out, endpoint_url=s3_endpoint, max_attempts=spec.retries.storage_attempts,
            max_pool_connections=spec.resources.upload_threads,
        )
        storage.check_access()
    except StorageError as exc:
        raise fail(str(exc)) from None

    from sdbatch.output import OutputMismatch, job_record

    job = job_record(spec, source, model_ref.pin)
    from sdbatch.lock import LockHeld
    from sdbatch.scheduler import EXIT_SHARDS_FAILED, WorkerStartError, run_job

    t0 = time.monotonic()
    try:
        outcome = run_job(
            spec, source, storage, job, address=address, endpoint_url=s3_endpoint, deadline=deadline_at,
            retry_failed=retry_failed, new_run=new_run,
        )
    except (OutputMismatch, LockHeld, WorkerStartError, StorageConfigError) as exc:
        raise fail(str(exc)) from None
    except StorageError as exc:
        raise fail(f"{exc}; committed shards are kept — run the same command again to go on", EXIT_SHARDS_FAILED) from None
    except KeyboardInterrupt:
        raise fail("interrupted; committed shards are kept — run the same command again to resume", 130) from None
    wall = time.monotonic() - t0
    if outcome.rows_generated == 0 and outcome.message:
        stdout.print(outcome.message)
    rate = outcome.rows_generated / wall if wall > 0 else 0.0
    stdout.print(
        f"{outcome.rows_generated} images generated this run ({outcome.rows_failed} rows failed, "
        f"{outcome.shards_skipped} shards already committed) in {wall:.1f} s, {rate:.2f} images/s, "
        f"batches {outcome.batch_fill:.0%} full → {storage.url}"
    )
    if outcome.exit_code:
        raise fail(outcome.message, outcome.exit_code)


def local_ray_environment(address: str | None, allow_unauthenticated: bool) -> str | None:
    """Prepare the local Ray cluster sdbatch starts when no ``--address``/``RAY_ADDRESS`` is
    given (before ray is imported): every process of it, dashboard and agents included, gets
    127.0.0.1 as its node IP, and Ray binds its servers to the node IP. ``ray.init`` alone turns
    ``_node_ip_address="127.0.0.1"`` into the host's address on Linux; Ray's
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (single-machine mode, inherited by every process
    the cluster starts) keeps it loopback. Returns an error when authentication is disabled and
    the user did not opt in, else None."""
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled" and not allow_unauthenticated:
        return ("RAY_AUTH_MODE=disabled: the local Ray cluster would accept commands from any process on this "
                "machine without a token. Unset RAY_AUTH_MODE (token authentication is Ray's default), or pass "
                "--allow-unauthenticated-ray if that is really wanted; nothing was written")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return None


def preflight_clip_model(location: str | None, endpoint_url: str | None) -> str | None:
    """Check ``scoring.clip_model`` names a transformers folder before any worker starts."""
    if location is None:
        return None
    fix = "; set scoring.clip_model to a folder written by CLIPModel.save_pretrained (config.json + model.safetensors)"
    from sdbatch.storage import StorageError, open_storage

    try:
        found = open_storage(location, endpoint_url=endpoint_url).exists("config.json")
    except StorageError as exc:
        return f"scoring.clip_model {location!r}: {exc}"
    return None if found else f"scoring.clip_model {location!r}: no config.json there{fix}"


@app.command()
def status(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    s3_endpoint: Optional[str] = EndpointOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the raw progress snapshot as JSON."),
) -> None:
    """Show a job's progress, read from its output location alone (works from any machine)."""
    import json

    from sdbatch.lock import lock_is_stale
    from sdbatch.output import JOB_KEY, LOCK_KEY, PROGRESS_KEY, SUCCESS_KEY, committed_shards, read_json
    from sdbatch.storage import NotFound, StorageError, open_storage

    try:
        storage = open_storage(out_location, endpoint_url=s3_endpoint)
        job = read_json(storage, JOB_KEY)
        if job is None:
            raise fail(f"no sdbatch job at {out_location} (no _sdbatch/job.json)")
        progress = read_json(storage, PROGRESS_KEY) or {}
        success = read_json(storage, SUCCESS_KEY)
        lock = read_json(storage, LOCK_KEY)
        try:
            lock_age = storage.age(LOCK_KEY) if lock is not None else 0.0
        except NotFound:  # released meanwhile
            lock, lock_age = None, 0.0
        committed = len(committed_shards(storage))
    except StorageError as exc:
        raise fail(str(exc)) from None
    total = job["manifest"]["num_rows"]
    shards_total = progress.get("shards_total", "?")  # the plan needs the manifest; its driver wrote it
    state = "finished" if success else progress.get("state", "not started")
    driver_alive = lock is not None and not lock_is_stale(lock, lock_age)
    if state == "running" and not driver_alive:  # progress.json's last word came from a driver that died
        state = "interrupted (no driver is running it; run the same command to resume)"
    if as_json:
        stdout.print_json(json.dumps({"state": state, "shards_committed": committed, "shards_total": shards_total,
                                    "driver": lock, "driver_alive": driver_alive,
                                    "progress": progress, "success": success}))
        return
    stdout.print(f"job        {job['fingerprint']}  ({job['manifest']['source']}, {total} rows)")
    stdout.print(f"state      {state}")
    if lock is not None:
        who = f"host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {lock_age:.0f} s ago"
        stdout.print(f"driver     {who}" if driver_alive else f"driver     gone ({who}; its lease has expired)")
    stdout.print(f"shards     {committed}/{shards_total} committed")
    if progress:
        stdout.print(
            f"rows       {progress.get('rows_done')}/{progress.get('rows_total')} done, "
            f"{progress.get('rows_failed_this_run')} failed this run"
        )
        stdout.print(f"speed      {progress.get('images_per_second')} images/s, ETA {progress.get('eta_seconds')} s")
        stdout.print(f"updated    {progress.get('updated_at')}")
    if success:
        stdout.print(f"result     {success.get('rows_ok')} ok, {success.get('rows_failed')} failed, finished {success.get('finished_at')}")


@app.command()
def reproduce(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    row_id: str = typer.Argument(..., metavar="ID", help="The row id (the `id` column of the index)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the regenerated image here."),
    model: Optional[str] = typer.Option(None, "--model", help="Load the model from here instead of its recorded location (its fingerprint is still checked)."),
    s3_endpoint: Optional[str] = EndpointOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Regenerate one image from OUT's metadata alone and compare its bytes with the stored one.

    Exit codes: 0 the bytes match; 1 they differ (the largest pixel difference is printed);
    2 bad input (no job at OUT, unknown ID, a row that cannot be rebuilt)."""
    setup_logging(verbose)
    from sdbatch.audit import AuditError, Reproducer, open_job
    from sdbatch.storage import StorageError

    try:
        job_output = open_job(out_location, endpoint_url=s3_endpoint)
        reproducer = Reproducer(job_output, endpoint_url=s3_endpoint, model=model)
        if row_id not in reproducer.by_id:
            raise AuditError(f"no row with id {row_id!r} in the index of {out_location} ({job_output.index_source})")
        err.print(f"regenerating {row_id} …", highlight=False)
        result = reproducer.reproduce(row_id)
    except (AuditError, StorageError) as exc:
        raise fail(str(exc)) from None
    except ValueError as exc:  # ModelError and friends: the recorded model cannot be loaded
        raise fail(f"cannot reproduce {row_id}: {exc}") from None
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if output is not None:
        output.write_bytes(result.data)
    batch = f"batch {result.batch_id}: {len(result.batch_rows)} rows" + ("" if result.batch_rebuilt else " (NOT the recorded batch)")
    stdout.print(f"{result.key}  ({batch}; record from the {'stored image' if result.record_source == 'image' else 'index'})", soft_wrap=True)
    stdout.print(result.summary(), soft_wrap=True)
    if output is not None:
        stdout.print(f"wrote {output}")
    if not result.match:
        raise typer.Exit(1)


@app.command()
def verify(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    regenerate: int = typer.Option(0, "--regenerate", min=0, help="Also regenerate K random ok rows and report drift."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for choosing the rows to regenerate (default: random, printed)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --regenerate: load the model from here instead of its recorded location."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="First rewrite a finished job's missing, corrupt or incomplete index.parquet from its commits."),
    s3_endpoint: Optional[str] = EndpointOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Check the index against job.json, the manifest and the commits, and that every index row's
    object exists with its recorded size and sha256; list orphans.

    Orphans (objects under images/ or shards/ that no committed index row names) are reported
    but are not an error: readers trust the index, never a listing. Exit codes: 0 clean;
    1 objects missing, mismatched or foreign, the index incomplete, or regenerated rows drifted; 2 no job at OUT."""
    setup_logging(verbose)
    from sdbatch.audit import AuditError
    from sdbatch.audit import verify as run_verify
    from sdbatch.storage import StorageError

    try:
        report = run_verify(out_location, regenerate=regenerate, seed=seed, endpoint_url=s3_endpoint, model=model,
                            rebuild_index=rebuild_index,
                            progress=lambda msg: err.print(msg, highlight=False) if verbose else None)
    except (AuditError, StorageError) as exc:
        raise fail(str(exc)) from None
    stdout.print(report.render(), soft_wrap=True, markup=False)
    if not report.clean:
        raise typer.Exit(1)


@app.command()
def export(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    to: str = typer.Option(..., "--to", help="hf (a Hugging Face imagefolder: datasets.load_dataset(DIR)) or webdataset."),
    dest: Path = typer.Argument(..., metavar="DIR", help="A new (or empty) local directory to write."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over the index columns, e.g. \"not blank and duplicate_of is null\"."),
    shard_size: int = typer.Option(1 << 30, "--shard-size", min=1, help="webdataset: bytes per tar shard."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Write OUT's images and index rows (all columns), filtered by --where, in a training format."""
    setup_logging(False)
    from sdbatch.export import ExportError
    from sdbatch.export import export as run_export
    from sdbatch.storage import StorageError, open_storage

    try:
        count = run_export(open_storage(out_location, endpoint_url=s3_endpoint), to, dest, where, shard_size)
    except (ExportError, StorageError) as exc:
        raise fail(str(exc)) from None
    stdout.print(f"exported {count} images to {dest} ({to})")


@app.command()
def stats(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Counts per label column, failed, blank and duplicate rows, and score distributions of OUT's index."""
    import json

    from sdbatch.export import ExportError, load_index
    from sdbatch.stats import job_stats, render
    from sdbatch.storage import StorageError, open_storage

    try:
        result = job_stats(*load_index(open_storage(out_location, endpoint_url=s3_endpoint)))
    except (ExportError, StorageError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        stdout.print(render(result), markup=False, soft_wrap=True)


@app.command()
def grid(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    dest: Path = typer.Option(..., "--output", "-o", help="Local directory for the grid images."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Draw one labelled X/Y grid image per prompt of a job built with `sdbatch manifest --grid`."""
    from sdbatch.export import ExportError, load_index
    from sdbatch.grid import GridError, render_grids
    from sdbatch.storage import StorageError, open_storage

    try:
        storage = open_storage(out_location, endpoint_url=s3_endpoint)
        paths = render_grids(storage, load_index(storage)[0], dest)
    except (ExportError, GridError, StorageError) as exc:
        raise fail(str(exc)) from None
    stdout.print(f"wrote {len(paths)} grid images to {dest}")


app.command("validate")(manifest_cli.validate)
app.command("manifest")(manifest_cli.manifest)
app.command("spec")(manifest_cli.spec)


def main() -> None:
    """Run the CLI, then leave through ``os._exit`` after the atexit handlers (Ray shutdown,
    logging) have run. Skipping interpreter finalisation matters: pyarrow's native thread pools
    can abort a process that is being torn down ("terminate called without an active
    exception", apache/arrow#34314), which would turn a finished command's exit code into -6."""
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
