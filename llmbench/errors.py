"""The one exception type for mistakes a user can cause, and the entry-point guard that
turns it into a one-line `error: ...` and exit status 2. Bugs still raise tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input or an environment that can't do what was asked. The message is one line."""


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry point's main() and exit with its status; user errors become one line."""
    try:
        status = main(argv)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the cause carried
        print(f"error: {message}", file=sys.stderr, flush=True)
        status = USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        status = 130
    sys.exit(status)
