"""The entry point: every command registered on the app, run with sdbatch's exit statuses."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback

# The command modules register their commands on ``app`` when imported: the order of these
# imports is --help's order of the commands, so they are kept out of any sorting.
# isort: off
from sdbatch.cli import submit  # noqa: F401
from sdbatch.cli import job_commands  # noqa: F401
from sdbatch.cli import readers  # noqa: F401
from sdbatch.cli import manifest_commands
# isort: on
from sdbatch.cli.app import app, command

command("validate", epilog="")(manifest_commands.validate)
command("manifest", epilog="")(manifest_commands.manifest)
command("spec", epilog="")(manifest_commands.spec)


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
