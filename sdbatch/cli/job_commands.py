"""``sdbatch status`` and ``sdbatch unlock``: reading and releasing a job's state in OUT."""

from __future__ import annotations

from typing import Optional

import typer

from sdbatch.cli.app import EndpointOpt, command, stdout
from sdbatch.errors import BadInput


@command()
def status(
    out_location: str = typer.Argument(..., metavar="OUT", help="The job's output location (directory or s3://…)."),
    s3_endpoint: Optional[str] = EndpointOpt,
    as_json: bool = typer.Option(False, "--json", help="Print state, row counts, ETA, per-worker rates and the raw snapshots as JSON (for monitors)."),
) -> None:
    """Show a job's progress, read from its output location alone (works from any machine)."""
    import json

    from sdbatch.data.index import JOB_KEY
    from sdbatch.output.index import failed_rows_text
    from sdbatch.output.state import read_state
    from sdbatch.run.policy import failed_shard_text
    from sdbatch.run.progress import eta_text
    from sdbatch.storage.open import open_storage

    state = read_state(open_storage(out_location, endpoint_url=s3_endpoint), tolerate_corrupt=True)
    if state is None:
        raise BadInput(f"no sdbatch job at {out_location} (no {JOB_KEY})")
    job, progress, success, lock = state.job, state.progress, state.success, state.lock
    shards_total = state.shards_total if state.shards_total is not None else "?"
    if as_json:
        # report.html charts the history; monitors want the current numbers
        snapshot = progress.model_dump(mode="json", exclude={"history"}) if progress else {}
        stdout.print_json(json.dumps({
            "state": state.phase_text, "rows_total": state.rows_total, **state.rows, "rows_in_flight": state.rows_in_flight,
            "images_per_second": progress.images_per_second if progress else None,
            "eta_seconds": progress.eta_seconds if progress and not success else None,
            "per_worker": snapshot.get("per_worker", {}),
            "shards_committed": state.shards_committed, "shards_total": shards_total,
            "driver": lock, "driver_alive": state.driver_alive, "progress": snapshot,
            "success": success.model_dump(mode="json") if success else None,
            "unreadable": state.unreadable,
        }))
        return
    stdout.print(f"job        {job.fingerprint}  ({job.manifest.source}, {state.rows_total} rows)")
    stdout.print(f"state      {state.phase_text}")
    if lock is not None:
        who = f"host {lock.get('host')}, pid {lock.get('pid')}, last heartbeat {state.lock_age:.0f} s ago"
        stdout.print(f"driver     {who}" if state.driver_alive else f"driver     gone ({who}; its lease has expired)")
    stdout.print(f"shards     {state.shards_committed}/{shards_total} committed")
    if progress:
        in_flight = f", {state.in_flight_text}" if state.rows_in_flight else ""
        stdout.print(f"rows       {progress.rows_done}/{progress.rows_total} done (in committed shards){in_flight}, "
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
    for problem in state.unreadable:
        stdout.print(f"unreadable {problem}", markup=False)


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
    from sdbatch.output.lock import break_lock
    from sdbatch.storage.open import open_storage

    held = break_lock(open_storage(out_location, endpoint_url=s3_endpoint), force=force)
    if held is None:
        stdout.print(f"no lock on {out_location}: nothing to do")
    else:
        stdout.print(f"removed the lock of driver {held.get('driver', '?')} (host {held.get('host', '?')}, "
                     f"pid {held.get('pid', '?')}) on {out_location}")
