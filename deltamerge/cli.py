"""The command line: a thin layer over the library that prints results and maps errors to exits.

Exit status: 0 done, 2 bad usage or input, 1 the result could not be made or verified.
Errors are one line without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

import click

from . import __version__
from .errors import DeltaMergeError
from .sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="deltamerge")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def main(debug: bool) -> None:
    """Rebuild models from published delta weights, streaming, with checksums end to end.

    \b
    Examples:
      deltamerge apply ./llama-7b ./vicuna-7b-delta ./vicuna-7b
      deltamerge make-delta ./llama-7b ./my-finetune ./my-finetune-delta
    """
    DEBUG["on"] = debug or bool(os.environ.get("DELTAMERGE_DEBUG"))
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: cleanly, keeping its partial folder for --resume."""
    raise KeyboardInterrupt


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


@main.command("apply", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, metavar="BASE DELTA... OUT")
@click.option("--kind", type=click.Choice(["add", "xor", "xor-files", "lora"]), default=None,
              help="Delta kind (default: detected from the delta's files).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Output dtype (default: the delta's; for LoRA, the base's).")
@click.option("--new-rows", type=click.Choice(["zero", "mean"]), default="zero", show_default=True,
              help="Rows the delta adds to embed_tokens/lm_head start at zero (FastChat v0) or "
                   "at the mean of the base's rows (Alpaca).")
@click.option("--qlora", type=click.Choice(["nf4", "nf4-dq"]), default=None,
              help="Merge a QLoRA adapter onto the NF4 round trip of the weights it targets, as "
                   "it was trained (nf4-dq: with double quantization, QLoRA's default); bit for "
                   "bit as bitsandbytes on CPU.")
@click.option("--qlora-dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="The dtype the trainer loaded the base in before quantizing it (default: the "
                   "base's; Guanaco: bfloat16).")
@click.option("--no-verify", is_flag=True, help="Skip all checksum checks.")
@click.option("--expect-md5", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE", help="xor-files: the release's `md5  filename` list of the decoded "
                                   "files; every listed file must match.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command, redoing only unfinished shards.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", default=None,
              help="Upload the result to this Hub repo when done (with a model card).")
@common_run_options
@handle_errors
def apply_cmd(paths, kind, dtype, new_rows, qlora, qlora_dtype, no_verify, expect_md5, resume,
              push_to, max_shard_size, block_size, force, workers, quiet) -> None:
    """Rebuild a model from BASE and one or more DELTAs into OUT.

    BASE and each DELTA are local folders (or Hub repo ids). Several DELTAs are applied in
    order in one pass. OUT appears only when complete.

    \b
    Example:
      deltamerge apply ./llama-13b ./vicuna-13b-delta-v1.1 ./vicuna-13b
    """
    from .apply import apply_delta

    if len(paths) < 3:
        raise click.UsageError("apply needs BASE, at least one DELTA, and OUT")
    base, deltas, out = paths[0], list(paths[1:-1]), paths[-1]
    result = apply_delta(
        base, deltas, out, kind=kind, dtype=dtype, new_rows=new_rows,
        max_shard_size=max_shard_size, block_size=block_size or DEFAULT_BLOCK_BYTES,
        force=force, verify=not no_verify, workers=workers or default_workers(),
        progress=not quiet, resume=resume, expect_md5=expect_md5, qlora=qlora,
        qlora_dtype=qlora_dtype,
    )
    if not quiet:
        _print_apply(result, base, deltas, no_verify)
    if push_to:
        _push(result.out, push_to, quiet)


def _push(folder, repo_id: str, quiet: bool) -> None:
    from .hub import push_to_hub

    pushed = push_to_hub(folder, repo_id)
    if not quiet:
        click.echo(f"pushed to {pushed.url}")


def _print_apply(result, base: str, deltas: list[str], no_verify: bool) -> None:
    rate = result.bytes_written / result.seconds if result.seconds else 0
    click.echo(f"rebuilt {result.out} from {base} + {' + '.join(deltas)} "
               f"(kind: {', '.join(result.kinds)})")
    if result.kinds == ["xor-files"]:
        click.echo(f"  files     {len(result.shards)} decoded")
    else:
        click.echo(f"  tensors   {result.tensors} in {len(result.shards)} shard(s)")
    click.echo(f"  bytes     {human(result.bytes_read)} read, {human(result.bytes_written)} written")
    click.echo(f"  time      {result.seconds:.1f} s ({human(rate)}/s written)")
    click.echo(f"  peak mem  {mib(result.peak_rss)}")
    for note in result.notes:
        click.echo(f"  note      {note}")
    if result.verified:
        verdict = "matches the publisher's result"
    elif no_verify:
        verdict = "not verified (--no-verify)"
    elif result.publisher_digest is None:
        verdict = "no manifest from the publisher: compare this digest with theirs"
    else:
        verdict = "not compared"
    click.echo(f"  digest    {result.model_digest} ({verdict})")


@main.command("make-delta", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base")
@click.argument("target")
@click.argument("out")
@click.option("--kind", type=click.Choice(["add", "xor"]), default="add", show_default=True,
              help="add: target - base (lossy in fp16); xor: bits XORed, lossless.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", default=None,
              help="Upload the delta to this Hub repo when done (with a model card).")
@common_run_options
@handle_errors
def make_delta_cmd(base, target, out, kind, push_to, max_shard_size, block_size, force, workers,
                   quiet) -> None:
    """Write the delta of TARGET against BASE into OUT, with a deltamerge.json manifest.

    \b
    Example:
      deltamerge make-delta ./llama-7b ./my-finetune ./my-finetune-delta
    """
    from .make_delta import make_delta

    result = make_delta(
        base, target, out, kind=kind, max_shard_size=max_shard_size,
        block_size=block_size or DEFAULT_BLOCK_BYTES, force=force,
        workers=workers or default_workers(), progress=not quiet,
    )
    if not quiet:
        _print_make(result)
    if push_to:
        _push(result.out, push_to, quiet)


def _print_make(result) -> None:
    click.echo(f"wrote {result.kind} delta {result.out} ({result.tensors} tensors, "
               f"{human(result.bytes_written)}, {result.seconds:.1f} s, peak {mib(result.peak_rss)})")
    share = result.mismatched_elements / max(result.elements, 1)
    click.echo(f"  base + delta reproduces the target except {result.mismatched_elements} of "
               f"{result.elements} elements ({share:.4%})")
    click.echo(f"  base digest    {result.base_digest}")
    click.echo(f"  result digest  {result.result_digest}")


# Commands that live in their own modules register themselves on ``main`` when imported.
from . import cli_convert, cli_hub, cli_integrity  # noqa: E402, F401
