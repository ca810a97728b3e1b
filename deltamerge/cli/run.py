"""Commands that make a model or a delta: apply, make-delta."""

from __future__ import annotations

from pathlib import Path

import click

from ..names import KINDS, MAKE_KINDS, NEW_ROWS, QLORA_KERNELS, QLORA_MODES, QLORA_SCOPES
from ..sizes import DEFAULT_BLOCK_BYTES
from .common import (
    DTYPE,
    common_run_options,
    default_workers,
    format_options,
    handle_errors,
    hub_options,
    hub_setup,
    human,
    mib,
    print_json,
    say,
    with_revision,
)
from .sign import pin_options, signer_pin, signing_key, signing_options

PUSH_HELP = ("Upload the result to this Hub repo when done (with a model card); the token and "
             "the repo id are checked before any work, and the repo is created by the push.")


@click.command("apply", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, metavar="BASE DELTA... OUT")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="Delta kind (default: detected from the delta's files).")
@click.option("--dtype", type=DTYPE, default=None,
              help="Output dtype: float16 (fp16), bfloat16 (bf16) or float32 (fp32) (default: "
                   "the delta's; for LoRA, the base's).")
@click.option("--new-rows", type=click.Choice(NEW_ROWS), default="zero", show_default=True,
              help="Rows the delta adds to embed_tokens/lm_head start at zero (FastChat v0) or "
                   "at the mean of the base's rows (Alpaca).")
@click.option("--qlora", type=click.Choice(QLORA_MODES), default=None,
              help="Merge a QLoRA adapter onto bitsandbytes' NF4 round trip of the base, as it "
                   "was trained (nf4-dq: with double quantization, QLoRA's default).")
@click.option("--qlora-dtype", type=DTYPE, default=None,
              help="The dtype the trainer loaded the base in before quantizing it (default: the "
                   "base's; Guanaco: bfloat16).")
@click.option("--qlora-scope", type=click.Choice(QLORA_SCOPES), default=None,
              help="What training quantized: all-linear (default: every Linear layer but the "
                   "output layer, as transformers' bitsandbytes loading does) or targets (only "
                   "the layers the adapter targets).")
@click.option("--qlora-kernel", type=click.Choice(QLORA_KERNELS), default=None,
              help="Whose bitsandbytes kernels quantized the base: cuda (default: the GPU's, "
                   "where QLoRA trains; nearest 8-bit code for nf4-dq's scales) or cpu (bit for "
                   "bit as bitsandbytes on CPU).")
@click.option("--safe-merge", is_flag=True,
              help="Merge as peft's merge_and_unload(safe_merge=True): each Linear layer's "
                   "product is rounded to the weight's dtype before it is added (default: as "
                   "merge_and_unload(), rounded once); a merged weight that is not finite is "
                   "refused.")
@click.option("--no-verify", is_flag=True, help="Skip all checksum checks.")
@click.option("--expect-md5", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="FILE", help="xor-files: the release's `md5  filename` list of the decoded "
                                   "files; every listed file must match.")
@click.option("--key-md5", default=None, hidden=True,
              help="enc: the md5 the key must have instead of OpenBuddy's (for made-up keys).")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command, redoing only unfinished shards "
                   "(decoded files, for xor-files and enc).")
@click.option("--lora-alpha", type=float, default=None, metavar="ALPHA",
              help="LoRA state dict without adapter_config.json (PandaGPT): its lora_alpha.")
@click.option("--lora-r", type=int, default=None, metavar="R",
              help="...and its rank, checked against the factors' shapes.")
@click.option("--lora-prefix", default=None, metavar="PREFIX",
              help="...and what precedes the base's names in its keys (default: detected).")
@click.option("--allow-repeat", is_flag=True,
              help="Apply a DELTA given twice twice (refused by default: usually a slip).")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", default=None, help=PUSH_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (the library's ApplyResult) instead of the summary.")
@format_options
@pin_options
@hub_options
@common_run_options
@handle_errors
def apply_cmd(paths, kind, dtype, new_rows, qlora, qlora_dtype, qlora_scope, qlora_kernel,
              safe_merge, no_verify, expect_md5, key_md5,
              resume, lora_alpha, lora_r, lora_prefix, allow_repeat, push_to, as_json, fmt, outtype,
              threads, mp, signer_key, signer_root, signer_name, signer_identity, signer_issuer,
              token, revision, cache_dir, max_shard_size, block_size, force, workers, quiet) -> None:
    """Rebuild a model from BASE and one or more DELTAs into OUT.

    BASE and each DELTA are local folders (or Hub repo ids, REPO@REV for a revision). Several
    DELTAs are applied in order in one pass. OUT appears only when complete. For OpenBuddy's
    encrypted releases (*.enc files), BASE is Meta's original LLaMA-7B folder or its
    consolidated.00.pth.

    \b
    Examples:
      deltamerge apply ./llama-13b ./vicuna-13b-delta-v1.1 ./vicuna-13b
      deltamerge apply ./llama-13b ./vicuna-13b-delta-v0 ./pandagpt-13b ./out --lora-alpha 32
      deltamerge apply ./llama-2-7b ./my-lora ./my-model-gguf --format gguf --outtype q8_0
      deltamerge apply ./llama-13b ./vicuna-13b-delta-v1.1 ./vicuna-13b-meta --format meta --mp 2
    """
    from ..apply import apply_delta  # deferred so --help and --version answer without loading torch

    if len(paths) < 3:
        raise click.UsageError("apply needs BASE, at least one DELTA, and OUT")
    inputs = with_revision(list(paths[:-1]), revision)
    base, deltas, out = inputs[0], inputs[1:], paths[-1]
    hub = hub_setup(token, cache_dir, quiet)
    target = _check_target(push_to, token)
    result = apply_delta(
        base, deltas, out, kind=kind, dtype=dtype, new_rows=new_rows,
        max_shard_size=max_shard_size, block_size=block_size,
        force=force, verify=not no_verify, workers=workers or default_workers(),
        progress=not quiet, resume=resume, expect_md5=expect_md5, key_md5=key_md5, qlora=qlora,
        qlora_dtype=qlora_dtype, qlora_scope=qlora_scope, qlora_kernel=qlora_kernel,
        safe_merge=safe_merge, lora_r=lora_r, lora_alpha=lora_alpha, lora_prefix=lora_prefix,
        hub=hub, format=fmt, outtype=outtype, mp=int(mp) if mp else None,
        allow_repeat=allow_repeat, threads=threads,
        signer=signer_pin(signer_key, signer_root, signer_name, signer_identity, signer_issuer),
    )
    if not quiet and not as_json:
        _print_apply(result, base, deltas, no_verify)
    pushed = _push(result.out, target, quiet or as_json, token) if target else None
    if as_json:
        print_json({**result.to_json(), **({"pushed": pushed} if pushed else {})})


def _check_target(repo_id: str | None, token: str | None) -> str | None:
    """A job that ends in a push checks the token and the repo id before it starts."""
    if repo_id is None:
        return None
    from ..hub.push import check_target  # deferred so --help answers without loading huggingface_hub

    return check_target(repo_id, token=token)


def _push(folder: Path, repo_id: str, quiet: bool, token: str | None) -> dict:
    """Push a finished result; a failure keeps it at OUT and says how to push it again."""
    from ..errors import DeltaMergeError, PushError
    from ..hub.push import push_to_hub, retry_command

    try:
        pushed = push_to_hub(folder, repo_id, token=token)
    except DeltaMergeError as exc:
        reason = exc.reason if isinstance(exc, PushError) else str(exc)
        raise PushError(f"{folder} is finished and kept, but its push to {repo_id} failed: "
                        f"{reason}", retry_command(folder, repo_id)) from None
    if not quiet:
        say(f"pushed to {pushed.url}")
    return pushed.to_json()


def _print_apply(result, base: str, deltas: list[str], no_verify: bool) -> None:
    rate = result.bytes_written / result.seconds if result.seconds else 0
    say(f"rebuilt {result.out} from {base} + {' + '.join(deltas)} "
        f"(kind: {', '.join(result.kinds)})")
    if result.kinds in (["xor-files"], ["enc"]):
        say(f"  files     {len(result.shards)} decoded")
    elif result.format == "hf":
        say(f"  tensors   {result.tensors} in {len(result.shards)} shard(s)")
    else:
        say(f"  tensors   {result.tensors} in {', '.join(result.shards)}")
    say(f"  bytes     {human(result.bytes_read)} read, {human(result.bytes_written)} written")
    say(f"  time      {result.seconds:.1f} s ({human(rate)}/s written)")
    say(f"  peak mem  {mib(result.peak_rss)}")
    for note in result.notes:
        say(f"  note      {note}")
    for signed in result.signatures:
        if signed["verified"]:
            say(f"  signed    by {signed['method']} {signed['signer']} (verified)")
    if result.verified:
        verdict = "matches the publisher's result"
    elif no_verify:
        verdict = "not verified (--no-verify)"
    elif result.publisher_digest is None:
        verdict = "no manifest from the publisher: compare this digest with theirs"
    else:
        verdict = "not compared"
    print_digests(result, verdict)


def print_digests(result, verdict: str) -> None:
    """hf: one digest. gguf and meta: the tensors as written, then the merge's before conversion,
    which is what a publisher's digest is of (so that is the one compared)."""
    if result.merged_digest is None:
        say(f"  digest    {result.algorithm} {result.model_digest} ({verdict})")
        return
    what = "GGUF tensors" if result.format == "gguf" else "Meta tensors"
    say(f"  digest    {result.algorithm} {result.model_digest} ({what} as written)")
    say(f"  merged    {result.algorithm} {result.merged_digest} (Hugging Face tensors before "
        f"conversion: {verdict})")


@click.command("make-delta", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base")
@click.argument("target")
@click.argument("out")
@click.option("--kind", type=click.Choice(MAKE_KINDS), default="add", show_default=True,
              help="add: target - base (lossy in fp16); xor: bits XORed, lossless; lora: a peft "
                   "LoRA adapter of rank --rank approximating target - base (truncated SVD).")
@click.option("--rank", type=click.IntRange(min=1), default=None, metavar="R",
              help="With --kind lora: the adapter's rank.")
@click.option("--compress", is_flag=True,
              help="With --kind xor: store the XOR zstd-compressed by byte planes (kind xor-zstd; "
                   "needs deltamerge[zstd]).")
@click.option("--compress-level", type=click.IntRange(1, 22), default=3, show_default=True,
              help="The zstd level of --compress.")
@click.option("--resume", is_flag=True,
              help="Finish an interrupted run of the same command, redoing only unfinished shards.")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", default=None, help=PUSH_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (the library's MakeDeltaResult) instead of the summary.")
@signing_options("--sign-")
@hub_options
@common_run_options
@handle_errors
def make_delta_cmd(base, target, out, kind, rank, compress, compress_level, resume, push_to, as_json,
                   sign_key, sign_cert, sign_chain, sign_sigstore, token, revision, cache_dir,
                   max_shard_size, block_size, force, workers, quiet) -> None:
    """Write the delta of TARGET against BASE into OUT, with a deltamerge.json manifest.

    BASE and TARGET are local folders or Hub repo ids; the manifest records where the base came
    from (the repo and its commit, or the folder's name), for the delta's model card.

    \b
    Examples:
      deltamerge make-delta ./llama-7b ./my-finetune ./my-finetune-delta
      deltamerge make-delta ./llama-7b ./my-finetune ./my-finetune-lora --kind lora --rank 64
    """
    from ..make import make_delta  # deferred so --help and --version answer without loading torch

    base, target = with_revision([base, target], revision)
    hub = hub_setup(token, cache_dir, quiet)
    repo = _check_target(push_to, token)
    result = make_delta(
        base, target, out, kind=kind, max_shard_size=max_shard_size,
        block_size=block_size or DEFAULT_BLOCK_BYTES, force=force,
        workers=workers or default_workers(), progress=not quiet, resume=resume, hub=hub,
        compress=compress, compress_level=compress_level, rank=rank,
        sign=signing_key(sign_key, sign_cert, sign_chain, sign_sigstore),
    )
    if not quiet and not as_json:
        _print_make(result)
    pushed = _push(result.out, repo, quiet or as_json, token) if repo else None
    if as_json:
        print_json({**result.to_json(), **({"pushed": pushed} if pushed else {})})


def _print_make(result) -> None:
    say(f"wrote {result.kind} delta {result.out} ({result.tensors} tensors, "
        f"{human(result.bytes_written)}, {result.seconds:.1f} s, peak {mib(result.peak_rss)})")
    share = result.mismatched_elements / max(result.elements, 1)
    say(f"  base + delta reproduces the target except {result.mismatched_elements} of "
        f"{result.elements} elements ({share:.4%})")
    for note in result.notes:
        say(f"  note           {note}")
    say(f"  base digest    blake3 {result.base_digest}")
    say(f"  result digest  blake3 {result.result_digest}")
    if result.signed_by:
        say(f"  signed by      {result.signed_by['method']} {result.signed_by['signer']} "
            "(model.sig)")
