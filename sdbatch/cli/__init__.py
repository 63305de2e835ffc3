"""The command line: typer commands that parse their arguments, call the packages below, and print;
the one error printer (``app.command``). Imports anything below it, lazily where torch or Ray
would follow, so ``--help``, ``validate``, ``status`` and ``submit --dry-run`` never import torch.
``app`` and ``main`` come from ``cli.main``, where every command module is registered."""

from sdbatch.cli.main import app, main

__all__ = ["app", "main"]
