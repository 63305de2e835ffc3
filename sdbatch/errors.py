"""The exit codes and the error base every documented condition derives from (design.md §7.2).

A leaf module (stdlib only), so every other module may import it. Each documented failure
raises a subclass of ``SdbatchError`` whose message says what is wrong, where, and the fix;
the class carries the exit code. The CLI has one printer for them (``error: …``, no
traceback); anything else that escapes a command is a bug and exits ``EXIT_BUG``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1  # never a documented condition
EXIT_BAD_INPUT = 2  # bad input or refused: nothing was written that a rerun cannot use
EXIT_ROWS_FAILED = 3  # finished; some rows failed permanently (rerun with --retry-failed)
EXIT_STOPPED = 4  # stopped at --deadline; rerun to resume
EXIT_SHARDS_FAILED = 5  # shards failed on every attempt, or storage/cluster failed under the driver
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; rerun to resume

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 a bug (please report it); 2 bad input or refused (manifest, spec, model, "
    "OUT, lock held, cluster too small); 3 finished, some rows failed (rerun with --retry-failed); "
    "4 stopped at --deadline (rerun to resume); 5 shards failed on every attempt, or storage or the "
    "cluster failed (rerun to retry); 130 interrupted (rerun to resume)."
)

#: The commands that only read a job's output (export, stats, grid): a storage failure is the
#: StorageError's own code, as under the driver — 5 (rerun to retry), 2 when it is the user's to
#: fix (bucket, credentials, endpoint: StorageConfigError).
READER_EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 a bug (please report it); 2 bad input (no job at OUT, a bad option, DIR not "
    "empty; storage misconfigured: bucket, credentials, endpoint); 5 storage failed while reading OUT, "
    "OUT names an object that is not there, or (export) an image is not the bytes its index row recorded "
    "(rerun to retry; `sdbatch verify OUT` lists what is missing or mismatched)."
)

RESUME_HINT = "committed shards are kept — run the same command again to go on"


class SdbatchError(Exception):
    """A documented condition. ``exit_code`` is what the CLI exits with after printing the
    message; subclasses set it."""

    exit_code = EXIT_BAD_INPUT


class BadInput(SdbatchError):
    """Bad input or a refusal (exit 2): the message names the input and the fix."""


class JobFailed(SdbatchError):
    """Storage or the cluster failed under a running driver (exit 5); rerunning resumes."""

    exit_code = EXIT_SHARDS_FAILED
