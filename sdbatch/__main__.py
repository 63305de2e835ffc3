"""``python -m sdbatch`` runs the CLI."""

from sdbatch.cli import main

main()
