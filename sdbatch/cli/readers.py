"""The commands that read a finished OUT: reproduce, verify, report, export, stats, grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdbatch.cli.app import EndpointOpt, command, err, setup_logging, stdout
from sdbatch.errors import READER_EXIT_CODES_HELP, BadInput

#: ``export --parallel auto``: fewer bytes of images than this to write are copied in this process
#: (starting or joining Ray would take longer than the copy).
EXPORT_IN_PROCESS_BELOW = 256 << 20


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
    from sdbatch.audit.job_output import open_job
    from sdbatch.audit.reproduce import Reproducer

    reproducer = Reproducer(open_job(out_location, endpoint_url=s3_endpoint), endpoint_url=s3_endpoint, model=model)
    reproducer.look_up(row_id)  # an unknown ID, or a row without an image, is refused before torch is imported
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
    sample: int = typer.Option(0, "--sample", min=0, help="Read only N random ok rows in full (size and sha256; seeded, printed) "
        "and only their shards' commits; every other row is checked from its shard's listing (exists, and its size in the "
        "files layout), every other commit from the listing of metadata/, as --listing-only does."),
    listing_only: bool = typer.Option(False, "--listing-only", help="Read no object: each row's object exists, and has its recorded "
        "size (files layout; a webdataset tar's members are not listed), from one listing per shard — for nightly checks. "
        "The commits are listed, not read. A corruption that keeps the size is NOT seen."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Ray tasks checking shards at once (default: the job's "
        "resources.workers, as submit; a job of at most 4,096 rows is checked in this process); 0 checks in this process, "
        "without Ray (quicker for small jobs)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Existing Ray cluster; default: start a local one."),
    regenerate: int = typer.Option(0, "--regenerate", min=0, help="Also regenerate K random ok rows and report drift."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for choosing the rows to read (--sample) and regenerate (default: random, printed)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --regenerate: load the model from here instead of its recorded location."),
    rebuild_index: bool = typer.Option(False, "--rebuild-index", help="First rewrite a finished job's missing, corrupt or incomplete index.parquet "
        "from its commits."),
    s3_endpoint: Optional[str] = EndpointOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Check the index against job.json, the manifest and the commits, and that every index row's
    object exists with its recorded size and sha256; list orphans. Objects are checked shard by
    shard in Ray tasks (--workers), the index read a batch at a time.

    Orphans (objects under images/ or shards/ that no committed index row names) are reported
    but are not an error: readers trust the index, never a listing. Exit codes: 0 clean;
    1 objects missing, mismatched or foreign, the index incomplete, or regenerated rows drifted; 2 no job at OUT,
    or bad options."""
    setup_logging(verbose)
    from sdbatch.audit.verify import verify as run_verify
    from sdbatch.job.preflight import local_ray_environment

    if workers != 0:
        local_ray_environment(address, False)
    report = run_verify(out_location, regenerate=regenerate, seed=seed, endpoint_url=s3_endpoint, model=model,
                        rebuild_index=rebuild_index, workers=workers, address=address, sample=sample,
                        listing_only=listing_only, bar=True,
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
    from sdbatch.audit.report import write_report
    from sdbatch.storage.open import open_storage

    stdout.print(f"report → {write_report(open_storage(out_location, endpoint_url=s3_endpoint), gpu_hour_usd)}")


@command(epilog=READER_EXIT_CODES_HELP)
def export(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    to: str = typer.Option(..., "--to", help="hf (Parquet shards data/<split>-NNNNN-of-NNNNN.parquet with the images inline: "
        "datasets.load_dataset(DEST)) or webdataset (tars)."),
    dest: str = typer.Argument(..., metavar="DEST", help="A new (or empty) directory or s3://… prefix to write; the one an "
        "interrupted export left, to finish it."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over the index columns, e.g. \"not blank and duplicate_of is null\"."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Comma-separated index columns to write (default: all)."),
    class_column: Optional[str] = typer.Option(None, "--class-column", help="A label column written as class numbers: hf a "
        "ClassLabel (names sorted), webdataset <key>.cls."),
    split: Optional[str] = typer.Option(None, "--split", help="Splits by a stable hash of the id, e.g. train=0.9,test=0.1 (default: all in train)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="Bytes of images per output shard, about (default 512 MiB)."),
    skip_mismatched: bool = typer.Option(False, "--skip-mismatched", help="Leave out rows whose stored image is not the one the index recorded (size, "
        "sha256) instead of refusing the export; they are named in a warning."),
    parallel: str = typer.Option("auto", "--parallel", help="Where output shards are written: ray (Ray tasks on the cluster; a "
        "local OUT or DEST must then be on every node: one machine or a shared filesystem), local (this process), auto "
        "(Ray when OUT and DEST are s3:// and there are over 256 MiB of images to write)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster for the shard tasks; default: start a local one."),
    push_to: Optional[str] = typer.Option(None, "--push-to", help="With --to hf and a local DEST: then upload DEST to this Hugging Face "
        "dataset repo (user/name) with your token (`hf auth login` or HF_TOKEN)."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Write OUT's images and index rows, selected by --where, as a training dataset in output
    shards of about --shard-size, resuming an interrupted export at DEST.

    Every image copied is checked against its index row's size and sha256. A selection of no
    rows is refused (exit 2) before anything is written."""
    setup_logging(False)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sdbatch.datasets.export import (
        DEFAULT_SHARD_BYTES,
        ExportError,
        ExportOptions,
        parse_splits,
        push_to_hub,
    )
    from sdbatch.datasets.export import export as run_export
    from sdbatch.run.progress import plural

    if parallel not in ("ray", "local", "auto"):
        raise ExportError(f"--parallel {parallel!r}: use one of ray, local, auto")
    if push_to and (to != "hf" or "://" in dest):
        raise ExportError("--push-to uploads a local hf export: give --to hf and a local DEST")
    options = ExportOptions(to=to, where=where, shard_bytes=shard_size or DEFAULT_SHARD_BYTES,
                            skip_mismatched=skip_mismatched, class_column=class_column, splits=parse_splits(split),
                            columns=tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else None)
    # auto: Ray tasks only where every node reaches OUT and DEST (s3://), and only for a copy that outweighs starting Ray
    on_s3 = all(location.startswith("s3://") for location in (out_location, dest))
    runner = None
    if parallel == "ray" or (parallel == "auto" and on_s3):
        from sdbatch.run.tasks import ray_tasks

        runner = ray_tasks(address)
    with Progress(TextColumn("export"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("export", total=None)
        result = run_export(out_location, dest, options, endpoint_url=s3_endpoint, run_tasks=runner,
                            in_process_below=EXPORT_IN_PROCESS_BELOW if parallel == "auto" else 0,
                            on_shard=lambda done, total: bar.update(task, completed=done, total=total))
    resumed = f", {result.shards - result.written_now} of them from an earlier run" if result.written_now < result.shards else ""
    stdout.print(f"exported {result.rows} images to {result.dest} ({to}, {plural(result.shards, 'shard')}{resumed})",
                 highlight=False)
    if push_to:
        stdout.print(f"pushed to {push_to_hub(Path(dest), push_to)}", highlight=False)


@command(epilog=READER_EXIT_CODES_HELP)
def stats(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Counts per label column, failed, blank and duplicate rows, and score distributions of OUT's index."""
    import json

    from sdbatch.audit.job_output import open_job
    from sdbatch.datasets.stats import job_stats, render

    result = job_stats(open_job(out_location, endpoint_url=s3_endpoint).index)
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
    from sdbatch.audit.job_output import open_job
    from sdbatch.datasets.grid import render_grids

    job = open_job(out_location, endpoint_url=s3_endpoint)
    paths = render_grids(job.index, job.layout, dest)
    stdout.print(f"wrote {len(paths)} grid images to {dest}")
