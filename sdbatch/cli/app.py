"""The ``sdbatch`` app: the typer application, its consoles and shared options, and the one error
printer; the commands live in the modules beside it (registered by ``main``).

Every command is registered through ``command``: a documented condition (an ``SdbatchError``)
is printed as ``error: …`` and exits with its class's code (``sdbatch.errors``); Ctrl-C and
SIGTERM exit 130; anything else is a bug (traceback, exit 1). ``--help``, ``validate`` and
``status`` never import torch."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from sdbatch.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_SHARDS_FAILED,
    RESUME_HINT,
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

StrictOpt = typer.Option(
    False, "--strict",
    help="Refuse columns named like a misspelled per-row column (widht, promt), and rows whose local init_image "
    "cannot be read, instead of warning.")

LiteralPromptsOpt = typer.Option(
    False, "--literal-prompts",
    help="Prompts mean brackets literally (model.prompt_syntax=literal): AUTOMATIC1111 emphasis (word:1.3), "
    "\\[word], BREAK and 75-token chunks are not read, and \\[a|b], \\[x:y:0.5] (refused without it) pass as text.")


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
