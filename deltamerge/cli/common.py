"""What every command shares: one-line errors with the documented exit status, sizes, options.

Exit status: 0 done, 2 bad usage or input, 1 the result could not be made or verified, 130 after
Ctrl-C and 143 after SIGTERM, 141 when the reader of stdout went away (``| head``). Errors are
one line; ``--debug`` adds the traceback before it and never changes the status.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable

import click

from ..errors import DeltaMergeError, Terminated, signal_status
from ..sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size

DEBUG = {"on": False}
# What a shell reports for a process SIGPIPE killed, as git and coreutils end in `... | head`.
BROKEN_PIPE_STATUS = 128 + int(signal.SIGPIPE)


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``, ``\\n``, ``\\u202e``).

    Tensor and file names come from strangers' files: printed raw, an escape sequence in one
    would drive the user's terminal (retitle it, clear it, or write the clipboard), and a
    newline in a path would cut an error message in two.
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def say(text: str) -> None:
    """One line of a command's report, printable whatever names it holds."""
    click.echo(printable(text))


def _fail(message: str, code: int) -> None:
    if DEBUG["on"]:
        traceback.print_exc()
    click.echo(f"deltamerge: error: {printable(message)}", err=True)
    sys.exit(code)


def _stdout_gone() -> bool:
    """Whether nobody reads stdout any more (its pipe's reader exited, as ``head`` does)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _quiet_exit() -> None:
    """End without a word: what is left in stdout's buffer goes to /dev/null, not to an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(BROKEN_PIPE_STATUS)


def handle_errors(fn: Callable) -> Callable:
    """One line per failure, the documented exit status, a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeltaMergeError as exc:
            _fail(str(exc) or type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt as exc:
            _fail("interrupted; nothing was written to OUT", signal_status(exc))
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) and _stdout_gone():
                _quiet_exit()
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1)

    return wrapper


def _size(ctx, param, value):
    try:
        return parse_size(value) if value is not None else None
    except DeltaMergeError as exc:
        raise click.BadParameter(str(exc)) from None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: cleanly, keeping its partial folder for --resume."""
    raise Terminated


def common_run_options(fn: Callable) -> Callable:
    options = [
        click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
                     help="Largest output shard (5GB = 5e9 bytes; 2GiB also accepted)."),
        click.option("--block-size", default=None, callback=_size, metavar="SIZE",
                     help=f"Largest working buffer (default {DEFAULT_BLOCK_BYTES >> 20}MiB); "
                          "peak memory is a few of these."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.option("--workers", type=click.IntRange(1, 64), default=None,
                     help="Threads for the pipeline (1 = no threads; default: from the machine)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def default_workers() -> int:
    return 1 if (os.cpu_count() or 1) < 2 else 2
