"""convert: Meta's original LLaMA layout to a Hugging Face folder."""

from __future__ import annotations

import click

from ..sizes import DEFAULT_BLOCK_BYTES
from .common import DTYPE, common_run_options, default_workers, handle_errors, human, mib, print_json


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
@common_run_options
@handle_errors
def convert_cmd(meta_dir, out, dtype, resume, as_json, max_shard_size, block_size, force, workers,
                quiet) -> None:
    """Convert Meta's LLaMA download (params.json, consolidated.NN.pth) into OUT.

    Streams tensor by tensor: a 13B model converts in a few hundred MiB of memory, and the
    tensors equal transformers' conversion bit for bit in the same dtype. checklist.chk is
    checked when present.

    \b
    Example:
      deltamerge convert ./LLaMA/13B ./llama-13b-hf
    """
    from ..convert import convert  # deferred so --help and --version answer without loading torch

    result = convert(
        meta_dir, out, dtype=dtype, max_shard_size=max_shard_size,
        block_size=block_size or DEFAULT_BLOCK_BYTES, force=force,
        workers=workers or default_workers(), progress=not quiet, resume=resume,
    )
    if as_json:
        print_json(result.to_json())
    elif not quiet:
        click.echo(f"converted {meta_dir} into {result.out}: {result.tensors} tensors, "
                   f"{len(result.shards)} shard(s), {human(result.bytes_written)}, "
                   f"{result.seconds:.1f} s, peak {mib(result.peak_rss)}")
        for note in result.notes:
            click.echo(f"  note      {note}")
        click.echo(f"  digest    {result.model_digest}")
