"""The ``validate``, ``manifest`` and ``spec`` commands, as plain typer-annotated functions.

``sdbatch.cli`` registers them through its error printer (``command("validate")(...)``), so a
bad input raised here (an ``SdbatchError``) ends as ``error: …`` on stderr and exit code 2 —
never a traceback. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdbatch.cli.app import LiteralPromptsOpt, StrictOpt
from sdbatch.errors import EXIT_BAD_INPUT


def validate(
    manifest: str = typer.Argument(..., help="Parquet manifest: a file, a directory of .parquet files, a glob or s3:// URI."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Job spec YAML (defaults and limits)."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec key: --set defaults.steps=30 (repeatable)."),
    max_errors: Optional[int] = typer.Option(None, "--max-errors", help="Bad rows to list (default limits.max_errors_shown)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    strict: bool = StrictOpt,
    literal_prompts: bool = LiteralPromptsOpt,
) -> None:
    """Check a manifest against the contract (types, ranges, ids, seeds…) before anything runs.

    Exit code 0: valid. Exit code 2: the manifest or spec is invalid (report on stderr).
    """
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.manifest.validate import validate_manifest
    from sdbatch.spec import load_spec

    overrides = {"limits.max_errors_shown": max_errors} if max_errors is not None else None
    job = load_spec(spec, set_, overrides)
    from sdbatch.models.families import model_traits

    traits = model_traits(job.model.configs_at)
    source = open_manifest(manifest)
    report = validate_manifest(source, job.with_model_defaults(traits), strict=strict, model=traits,
                               literal_prompts=literal_prompts)
    if json_out:
        payload = {
            "ok": report.ok,
            "num_rows": report.num_rows,
            "issue_count": report.issue_count,
            "issues": [vars(i) for i in report.issues],
            "warnings": report.warnings,
            "summary": report.summary,
        }
        typer.echo(json.dumps(payload, indent=2, default=str))
    if not report.ok:
        if not json_out:
            typer.echo(report.render(), err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    if not json_out:
        typer.echo(report.render())


def manifest(
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (blank lines skipped)."),
    from_: Optional[Path] = typer.Option(None, "--from", help="CSV or JSONL file (.csv, .jsonl, .ndjson); its columns are kept."),
    map_: list[str] = typer.Option([], "--map", help="Rename a --from column: --map prompt=text (TARGET=SOURCE, repeatable)."),
    template: list[str] = typer.Option(
        [], "--template", "-t",
        help="Prompt template (dynamicprompts syntax), expanded as a product: 'a {red|blue} {cat|dog}', "
        "'{2$$a|b|c}', '__colour__' (with --wildcards). Name a group to get a label column of its choices: '{color=red|blue}', "
        "'{colour=__colour__}', '{shape={small|large} circle|square}' (nested too). Repeatable.",
    ),
    wildcards: Optional[Path] = typer.Option(None, "--wildcards", help="Folder of wildcard files: __colour__ in a template draws from colour.txt."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Draw N distinct random prompts per template instead of every combination (all, once each, "
                                          "when there are fewer; a warning says so)."),
    sample_seed: int = typer.Option(0, "--sample-seed", help="Seed of --sample (same seed, same prompts)."),
    grid: list[str] = typer.Option(
        [], "--grid", help="X/Y grid axis: --grid seed=1-4 --grid guidance_scale=3,5,7; every prompt once per cell "
        "(draw the grids after the job with `sdbatch grid OUT -o DIR`).",
    ),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds per prompt: 0-99, 1,5,9 or 0-9,100. Default: none (derived)."),
    column: list[str] = typer.Option([], "--column", "-c", help="Constant column: --column steps=30 (repeatable)."),
    row_group_size: int = typer.Option(65_536, "--row-group-size", help="Rows per Parquet row group."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Validate the result against this job spec."),
    set_: list[str] = typer.Option([], "--set", help="Spec override for the validation (repeatable)."),
) -> None:
    """Build a manifest for dataset synthesis: prompts × seeds (+ constant columns) → Parquet.

    The written manifest is validated; exit code 2 when an input or the result is invalid.
    """
    from sdbatch.manifest.builder import build_manifest
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.manifest.validate import validate_manifest
    from sdbatch.spec import load_spec

    job = load_spec(spec, set_)
    n = build_manifest(
        out, prompts_file=prompts, table_file=from_, mapping=map_, templates=template, seeds=seeds,
        columns=column, row_group_size=row_group_size, overwrite=overwrite, wildcards=wildcards, sample=sample,
        sample_seed=sample_seed, grid=grid, warn=lambda message: typer.echo(f"warning: {message}", err=True),
    )
    report = validate_manifest(open_manifest(str(out)), job)
    if not report.ok:
        typer.echo(report.render(), err=True)
        typer.echo(f"wrote {n:,} rows to {out}, but they do not validate (see above)", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    typer.echo(report.render())
    typer.echo(f"wrote {n:,} rows to {out}")


def spec(
    schema: bool = typer.Option(False, "--schema", help="Print the job spec's JSON schema."),
    spec_file: Optional[Path] = typer.Option(None, "--spec", help="A job spec YAML to check and print, resolved."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set resources.batch_size=16 (repeatable)."),
) -> None:
    """Print the job spec schema (--schema), or check a spec and print it with every default filled in."""
    from sdbatch.spec import load_spec, spec_schema

    if schema:
        typer.echo(json.dumps(spec_schema(), indent=2))
        return
    job = load_spec(spec_file, set_)
    import yaml

    typer.echo(f"# resolved job spec (fingerprint {fingerprint_of(job)})")
    for line in model_lines(job.model.configs_at):
        typer.echo(f"# model: {line}")
    typer.echo(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False).rstrip())


def model_lines(name: str) -> list[str]:
    """What the spec's model is and what its parameters mean (``ModelTraits.describe``), when its
    configs can be read here (a local or built-in model)."""
    from sdbatch.models.builtin import local_model_dir
    from sdbatch.models.errors import FamilyError
    from sdbatch.models.families import local_traits
    from sdbatch.storage.locations import is_s3

    if is_s3(name):
        return ["an s3:// model: its native size and defaults are read at submit (--dry-run shows them)"]
    try:
        return local_traits(local_model_dir(name)).describe()
    except (FamilyError, ValueError, OSError) as exc:
        return [f"its configs cannot be read here ({exc})"]


def fingerprint_of(job) -> str:  # noqa: ANN001 - JobSpec, imported lazily
    from sdbatch.spec import fingerprint

    return fingerprint(job.fingerprint_fields())
