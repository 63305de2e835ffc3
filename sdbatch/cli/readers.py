"""The commands that read a finished OUT: reproduce, verify, report, export, stats, grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdbatch.cli.app import EndpointOpt, command, err, setup_logging, stdout
from sdbatch.errors import READER_EXIT_CODES_HELP, BadInput


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
    reproducer.entry(row_id)  # an unknown ID is refused before the model loads
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
    sample: int = typer.Option(0, "--sample", min=0, help="Read only N random ok rows in full (size and sha256; seeded, printed); "
        "every other row is checked from its shard's listing (exists, and its size in the files layout)."),
    listing_only: bool = typer.Option(False, "--listing-only", help="Read no object: each row's object exists, and has its recorded "
        "size (files layout; a webdataset tar's members are not listed), from one listing per shard — for nightly checks. "
        "A corruption that keeps the size is NOT seen."),
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
    to: str = typer.Option(..., "--to", help="hf (a Hugging Face imagefolder: datasets.load_dataset(DIR)) or webdataset."),
    dest: Path = typer.Argument(..., metavar="DIR", help="A new (or empty) local directory to write."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over the index columns, e.g. \"not blank and duplicate_of is null\"."),
    shard_size: int = typer.Option(1 << 30, "--shard-size", min=1, help="webdataset: bytes per tar shard."),
    skip_mismatched: bool = typer.Option(False, "--skip-mismatched", help="Leave out rows whose stored image is not the one the index recorded (size, "
        "sha256) instead of refusing the export; they are named in a warning."),
    s3_endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Write OUT's images and index rows (all columns), filtered by --where, in a training format.

    Every image copied is checked against its index row's size and sha256."""
    setup_logging(False)
    from sdbatch.datasets.export import export as run_export
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
