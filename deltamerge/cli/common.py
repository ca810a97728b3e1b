"""What every command shares: one-line errors with the documented exit status, sizes, options.

Exit status: 0 done, 2 bad usage or input, 1 the result could not be made or verified.
Errors are one line without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import click

from ..errors import DeltaMergeError
from ..sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size

DEBUG = {"on": False}


def _fail(message: str, code: int) -> None:
    click.echo(f"deltamerge: error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """One line per failure, the documented exit status, a traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeltaMergeError as exc:
            if DEBUG["on"]:
                raise
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written to OUT", 1)
        except OSError as exc:
            if DEBUG["on"]:
                raise
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
    raise KeyboardInterrupt


def common_run_options(fn: Callable) -> Callable:
    options = [
        click.option("--max-shard-size", default=None, metavar="SIZE",
                     help=f"Largest output shard (default {DEFAULT_SHARD_SIZE}; 5GB = 5e9 bytes, 2GiB "
                          "also accepted); with --format gguf, split as llama.cpp splits (default: "
                          "one file)."),
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


def format_options(fn: Callable) -> Callable:
    """What OUT holds: the format and its own options."""
    options = [
        click.option("--format", "fmt", type=click.Choice(["hf", "gguf", "meta"]), default="hf",
                     show_default=True,
                     help="hf: safetensors shards and the model's files; gguf: the file llama.cpp's "
                          "convert_hf_to_gguf.py would write from that; meta: Meta's "
                          "consolidated.NN.pth, params.json, tokenizer.model."),
        click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
                     help="GGUF tensor type (default: the result's dtype)."),
        click.option("--mp", type=click.Choice(["1", "2", "4", "8"]), default=None,
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
