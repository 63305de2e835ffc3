"""``python -m sdbatch`` runs the CLI."""

from sdbatch.cli.main import main

main()
