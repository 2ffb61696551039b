"""The one exception type for mistakes a user can cause, and the entry-point guard that
turns it into a one-line `error: ...` and exit status 2. Bugs still raise tracebacks."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

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
    exit_now(status)


def exit_now(status: int | None) -> NoReturn:
    """Exit once the entry point's work is done, without the interpreter's teardown: after a
    torch + transformers run, freeing every module and torch's C++ state takes about 0.9 s
    here, paid again by every step run.py starts. What a normal exit does that matters is
    still done first: other threads are waited for, the atexit functions run (log handlers,
    temporary folders, weakref finalizers, multiprocessing's children), stdout and stderr are
    flushed. Files are written and closed by the code that writes them (llmbench.atomic)."""
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Py_Finalize would run next
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status is None else int(status))
