"""convert: Meta's original LLaMA layout to a Hugging Face folder."""

from __future__ import annotations

import click

from .common import (
    DTYPE,
    common_run_options,
    default_workers,
    format_options,
    handle_errors,
    human,
    mib,
    print_json,
    say,
)
from .run import print_digests


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("meta_dir")
@click.argument("out")
@click.option("--dtype", type=DTYPE, default=None,
              help="Output dtype: float16 (fp16), bfloat16 (bf16) or float32 (fp32) (default: "
                   "the checkpoint's own).")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command, redoing only unfinished shards.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (the library's ApplyResult) instead of the summary.")
@format_options
@common_run_options
@handle_errors
def convert_cmd(meta_dir, out, dtype, resume, as_json, fmt, outtype, threads, mp, max_shard_size,
                block_size, force, workers, quiet) -> None:
    """Convert Meta's LLaMA download (params.json, consolidated.NN.pth) into OUT.

    Streams tensor by tensor: a 13B model converts in a few hundred MiB of memory, and the
    tensors equal transformers' conversion bit for bit in the same dtype. checklist.chk is
    checked when present. --format gguf writes what llama.cpp's converter would write from
    that Hugging Face result; --format meta re-shards (--mp).

    \b
    Examples:
      deltamerge convert ./LLaMA/13B ./llama-13b-hf
      deltamerge convert ./LLaMA/13B ./llama-13b-gguf --format gguf --outtype f16
    """
    from ..conversion import convert  # deferred so --help and --version answer without loading torch

    result = convert(
        meta_dir, out, dtype=dtype, max_shard_size=max_shard_size,
        block_size=block_size, force=force,
        workers=workers or default_workers(), progress=not quiet, resume=resume, format=fmt,
        outtype=outtype, mp=int(mp) if mp else None, threads=threads,
    )
    if as_json:
        print_json(result.to_json())
    elif not quiet:
        say(f"converted {meta_dir} into {result.out}: {result.tensors} tensors, "
            f"{len(result.shards)} {'shard' if result.format == 'hf' else 'file'}(s), "
            f"{human(result.bytes_written)}, {result.seconds:.1f} s, peak {mib(result.peak_rss)}")
        for note in result.notes:
            say(f"  note      {note}")
        print_digests(result, "compare this digest with others' conversions")
