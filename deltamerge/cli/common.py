"""What every command shares: one-line errors with the documented exit status, sizes, options.

Exit status: 0 done, 2 bad usage or input, 1 the result could not be made or verified, 130 after
Ctrl-C and 143 after SIGTERM, 141 when the reader of stdout went away (``| head``). Errors are
one line; ``--debug`` adds the traceback before it and never changes the status.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable

import click

from ..errors import DeltaMergeError, signal_status
from ..interrupts import running
from ..names import DTYPE_NAMES
from ..outputs import FORMATS, OUTPUT_FORMATS
from ..outputs.gguf import OUTTYPES, QUANTIZED_BLOCK_BYTES
from ..outputs.meta import MP_SHARDS
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


# What a signal that stopped a command before it kept anything means, in its own terms: only
# apply, make-delta and convert have an OUT (a later stop keeps their partial folder, and says so).
_OUT_UNTOUCHED = "interrupted; nothing was written to OUT"
INTERRUPTED = {
    "apply": _OUT_UNTOUCHED,
    "make-delta": _OUT_UNTOUCHED,
    "convert": _OUT_UNTOUCHED,
    "push": "interrupted before the push finished: a push commits all of the folder or nothing; "
            "run the same command again (files already uploaded are not sent again)",
    "checksum": "interrupted before the digests were complete; nothing was written",
    "verify": "interrupted before every tensor was checked: nothing was verified",
    "inspect": "interrupted",
    "diff": "interrupted before the comparison was complete",
}


def interrupted_message() -> str:
    """The line for a Ctrl-C or SIGTERM, for the command that was running."""
    ctx = click.get_current_context(silent=True)
    return INTERRUPTED.get(ctx.info_name if ctx else "", "interrupted")


def handle_errors(fn: Callable) -> Callable:
    """One line per failure, the documented exit status, a traceback only with --debug.

    The command's work is ``interrupts.running()``: a signal raises there, and is reported here.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with running():
                return fn(*args, **kwargs)
        except DeltaMergeError as exc:
            _fail(str(exc) or type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt as exc:
            _fail(interrupted_message(), signal_status(exc))
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


def mib(n: int | None) -> str:
    """``n`` bytes in MiB; None is a measure the platform lacks (peak memory on Windows)."""
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def common_run_options(fn: Callable) -> Callable:
    options = [
        click.option("--max-shard-size", default=None, metavar="SIZE",
                     help=f"Largest output shard (default {DEFAULT_SHARD_SIZE}; 5GB = 5e9 bytes, 2GiB "
                          "also accepted); with --format gguf, split as llama.cpp splits (default: "
                          "one file)."),
        click.option("--block-size", default=None, callback=_size, metavar="SIZE",
                     help=f"Largest working buffer (default {DEFAULT_BLOCK_BYTES >> 20}MiB; "
                          f"{QUANTIZED_BLOCK_BYTES >> 20}MiB with a quantized --outtype); peak memory "
                          "is a few of these."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.option("--workers", type=click.IntRange(1, 64), default=None,
                     help="Threads for the pipeline (1 = no threads; default: from the machine)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def format_options(fn: Callable) -> Callable:
    """What OUT holds: the format and its own options."""
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf",
                     show_default=True,
                     help="; ".join(f"{f.name}: {f.summary}" for f in OUTPUT_FORMATS) + "."),
        click.option("--outtype", type=click.Choice(OUTTYPES), default=None,
                     help="GGUF tensor type (default: the result's dtype); q4_k_m and the types after "
                          "q8_0: what llama-quantize writes from the f16/bf16/f32 file."),
        click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="Threads that compute LoRA products and quantize GGUF tensors (default: "
                          "the machine's cores); the bytes are the same whatever their number."),
        click.option("--mp", type=click.Choice([str(n) for n in MP_SHARDS]), default=None,
                     help="Meta model-parallel shards (default 1)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class OneLineLog(logging.Handler):
    """Warnings of the libraries deltamerge drives (the gguf package's), in deltamerge's style."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().strip().splitlines()
        click.echo(f"deltamerge: warning: {message[0] if message else record.name}", err=True)


def route_library_logs() -> None:
    log = logging.getLogger("gguf")
    log.setLevel(logging.WARNING)
    log.propagate = False
    if not any(isinstance(h, OneLineLog) for h in log.handlers):
        log.addHandler(OneLineLog())


def default_workers() -> int:
    return 1 if (os.cpu_count() or 1) < 2 else 2


DTYPE = click.Choice(DTYPE_NAMES, case_sensitive=False)


def _debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        DEBUG["on"] = True


def debug_option() -> click.Option:
    """``--debug`` for a subcommand, so it works after the command's name as well as before."""
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_debug, help="Show tracebacks on errors.")


def hub_options(fn: Callable) -> Callable:
    """``--token``, ``--revision`` and ``--cache-dir``, spelled as huggingface-cli spells them."""
    options = [
        click.option("--token", metavar="TOKEN", default=None,
                     help="Hub token (default: HF_TOKEN, or the one `hf auth login` saved)."),
        click.option("--revision", metavar="REV", default=None,
                     help="Revision (branch, tag or commit) of the one Hub input; with several, "
                          "write REPO@REV for each."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Hugging Face cache to download into (default: HF_HUB_CACHE)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def hub_setup(token: str | None, cache_dir: str | None, quiet: bool) -> dict | None:
    """The library's ``hub=`` argument for these options; -q silences huggingface_hub's bars too."""
    from ..sources.hub import quiet_downloads, use_cache_dir  # deferred: loads huggingface_hub

    if cache_dir is not None:
        use_cache_dir(cache_dir)
    if quiet:
        quiet_downloads()
    return {"token": token} if token else None


def with_revision(inputs: list[str], revision: str | None) -> list[str]:
    """``--revision`` applied to the one input that is a Hub repo id without a revision of its own."""
    if revision is None:
        return inputs
    from ..errors import NotFoundError
    from ..sources.inputs import hub_repo_id  # deferred: the sources package loads torch

    def is_repo(text: str) -> bool:
        try:
            return hub_repo_id(text) is not None
        except NotFoundError:
            return False  # a missing path: the command names it in its own words

    hub = [i for i, text in enumerate(inputs) if is_repo(text)]
    if len(hub) != 1:
        what = "no input is a Hub repo id" if not hub else f"{len(hub)} inputs are Hub repo ids"
        raise click.UsageError(f"--revision names the revision of one Hub input, and {what}: "
                               "write REPO@REV for each instead")
    if "@" in inputs[hub[0]]:
        raise click.UsageError(f"{inputs[hub[0]]} already names its revision: drop --revision")
    return [f"{text}@{revision}" if i == hub[0] else text for i, text in enumerate(inputs)]


def print_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=1))
