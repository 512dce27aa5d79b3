"""One error path for every tool and the entry point.

An *expected* failure (a bad option or file, a missing or corrupt file, a full disk, a mismatch between a
model and its data) raises a :class:`MegatronKIError` whose message is one line naming the culprit, what was
found and what was expected. :func:`run_main` turns it (and an ``OSError`` from the environment) into that
one line on stderr and a non-zero exit code; anything else is a bug and keeps its traceback. ``--debug`` (or
``MEGATRON_KI_DEBUG=1``) shows the traceback of expected failures too.

Exit codes: 1 expected failure, 2 bad command line or configuration, 75 (``EX_TEMPFAIL``) stopped on request
after saving a checkpoint (a scheduler may requeue the job), 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130
DEBUG_ENV = "MEGATRON_KI_DEBUG"


class MegatronKIError(Exception):
    """An expected failure caused by the input or the environment; ``str(e)`` is the one-line message."""

    exit_code = EXIT_FAILURE
    all_ranks = False
    """True when every rank raises it after agreeing through a collective: only rank 0 prints it."""


class UsageError(MegatronKIError):
    """A command-line option is missing, unknown or out of range."""

    exit_code = EXIT_USAGE


def describe_os_error(e: OSError) -> str:
    """``OSError`` -> ``"PATH: reason"``; a full disk says so in words and names the file being written."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device (the disk is full)"
    paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p]
    return f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show a traceback for expected errors too (or {DEBUG_ENV}=1)"
    )


def error_line(prog: str, e: BaseException) -> str:
    """The one line printed for an expected failure ``e`` of ``prog``."""
    if isinstance(e, OSError) and not isinstance(e, MegatronKIError):
        message = describe_os_error(e)
    else:
        message = " ".join(str(e).split("\n"))
    return f"{prog}: error: {message}"


def exit_code_for(e: BaseException) -> int | None:
    """The exit code of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(e, MegatronKIError):
        return e.exit_code
    if isinstance(e, OSError):
        return EXIT_FAILURE
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return None


def run_main(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a tool's ``main(argv)``: an expected failure is one line on stderr and its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except BaseException as e:
        code = exit_code_for(e)
        if code is None or isinstance(e, SystemExit) or debug_requested(argv):
            raise
        if code == EXIT_INTERRUPTED:
            print(f"{prog}: interrupted", file=sys.stderr)
        else:
            print(error_line(prog, e), file=sys.stderr)
        return code


def print_traceback(e: BaseException) -> None:
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
