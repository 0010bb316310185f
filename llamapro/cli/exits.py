"""How the command line turns a deliberate llamapro error into one line on stderr and an exit code.

The code is the exception's own (``llamapro.errors.exit_code_of``); anything that is not a
:class:`~llamapro.errors.LlamaproError` is a bug and raises with its traceback.
"""

from __future__ import annotations

import functools
import sys

from llamapro.errors import EXIT_INTERRUPTED, GateFailed, IdentityError, LlamaproError, exit_code_of


def report(e: LlamaproError) -> int:
    """Print ``e`` as the CLI does and return its exit code: ``FAILED: ...`` for a failed identity
    proof, the gate's own sentence for a failed gate, ``error: ...`` for everything else."""
    if isinstance(e, IdentityError):
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
    elif isinstance(e, GateFailed):
        print(str(e), file=sys.stderr, flush=True)
    else:
        print(f"error: {e}", file=sys.stderr, flush=True)
    return exit_code_of(e)


def guarded(fn):
    """``fn(args) -> int`` with llamapro errors mapped to exit codes (for command handlers that
    are also called without :func:`llamapro.cli.main`, e.g. by tests and jobs/)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except LlamaproError as e:
            return report(e)

    return wrapper


def interrupted() -> int:
    print("interrupted; no partial output was left in place", file=sys.stderr)
    return EXIT_INTERRUPTED
