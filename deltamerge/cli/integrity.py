"""Commands about checksums: checksum, verify, inspect, diff.

Thin printers over :mod:`deltamerge.integrity.checks`. Exit status as everywhere: 0 for success, 2 for bad
input; a verification that fails exits 1 after listing every tensor at fault, and ``diff`` exits
1 when the checkpoints differ, as diff(1) does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from ..errors import VerificationError
from ..names import ALGORITHMS, ROLES
from .common import handle_errors, hub_options, hub_setup, human, print_json, say, with_revision
from .sign import pin_options, signer_pin

HELP = {"help_option_names": ["-h", "--help"]}


def _quiet_option(fn: Callable) -> Callable:
    """-q and the Hub options every check takes (a DIR may be a Hub repo id)."""
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(fn)
    return hub_options(fn)


ALGORITHM_CHOICE = click.Choice(ALGORITHMS)


def _json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(fn)


@click.command("checksum", context_settings=HELP)
@click.argument("folders", nargs=-1, required=True, metavar="DIR...")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write every tensor's digest to this JSON file (for verify --manifest; "
                   "one DIR only).")
@click.option("-a", "--algorithm", type=ALGORITHM_CHOICE, default="blake3", show_default=True,
              help="blake3 (manifest format 2) or sha256 (format 1, and digests published "
                   "before it).")
@_json_option
@_quiet_option
@handle_errors
def checksum_cmd(folders: tuple[str, ...], output: str | None, algorithm: str, as_json: bool,
                 quiet: bool, token: str | None, revision: str | None,
                 cache_dir: str | None) -> None:
    """Print the model digest of the checkpoint in each DIR, one `DIGEST  DIR` line each.

    The digest is of the tensors' names, dtypes, shapes and bytes, not of the files: the same
    weights give the same digest as safetensors or .bin, in any number of shards (see
    docs/manifest.md). Compare it with the one a publisher gives, in the same algorithm. A DIR
    may be a Hub repo id. With --json, a list of one object per DIR: its folder, model digest
    and tensors' digests.

    \b
    Examples:
      deltamerge checksum ./llama-7b ./my-llama-7b
      deltamerge checksum ./llama-7b --output llama-7b.digests.json
      deltamerge verify ./other-copy --manifest llama-7b.digests.json
      deltamerge checksum ./llama-7b --algorithm sha256
    """
    from ..integrity.checks import checksum  # deferred so --help and --version answer without loading torch

    if output and len(folders) > 1:
        raise click.UsageError("--output writes the digests of one DIR: give one, or use --json")
    folders = tuple(with_revision(list(folders), revision))
    hub = hub_setup(token, cache_dir, quiet)
    reports = []
    for folder in folders:
        result = checksum(folder, progress=not quiet and not as_json, hub=hub,
                          algorithm=algorithm)
        if output:
            result.write(output)
        if as_json:
            reports.append({"folder": folder, **result.to_json()})
        else:
            say(f"{result.model_digest}  {folder}")
    if as_json:
        print_json(reports)


@click.command("verify", context_settings=HELP)
@click.argument("folder", metavar="DIR")
@click.option("-m", "--manifest", required=True, metavar="FILE",
              help="deltamerge.json, deltamerge-result.json, or a `checksum --output` file "
                   "(a folder: its deltamerge.json or deltamerge-result.json).")
@click.option("--role", type=click.Choice(ROLES), default="result", show_default=True,
              help="Which side of a deltamerge.json DIR should be: the delta's result or its base.")
@click.option("-a", "--algorithm", type=ALGORITHM_CHOICE, default=None,
              help="Insist on the manifest's digests being in this algorithm (default: compare "
                   "in whichever the manifest holds: sha256 for format 1, blake3 for format 2).")
@pin_options
@_json_option
@_quiet_option
@handle_errors
def verify_cmd(folder: str, manifest: str, role: str, algorithm: str | None,
               signer_key: str | None, signer_root: str | None, signer_name: str | None,
               signer_identity: str | None, signer_issuer: str | None, as_json: bool,
               quiet: bool, token: str | None, revision: str | None,
               cache_dir: str | None) -> None:
    """Check every tensor of DIR against a manifest's digests.

    DIR is hashed in the algorithm of the manifest (format 1: sha256, format 2: blake3). Exits 0
    when all match, 1 listing every tensor that is missing, extra or different. With
    --signer-key or --signer-root, the local folder holding the manifest (the delta) must be
    signed by that signer first (its model.sig, every file unchanged), or DIR is not read.

    \b
    Examples:
      deltamerge verify ./vicuna-7b --manifest ./vicuna-7b-delta/deltamerge.json
      deltamerge verify ./llama-7b --manifest ./vicuna-7b-delta/deltamerge.json --role base
      deltamerge verify ./vicuna-7b --manifest ./vicuna-7b/deltamerge-result.json
    """
    from ..integrity.checks import verify  # deferred so --help and --version answer without loading torch

    folder, manifest = with_revision([folder, manifest], revision)
    pin = signer_pin(signer_key, signer_root, signer_name, signer_identity, signer_issuer)
    signed = _check_signer(manifest, pin) if pin else None
    hub = hub_setup(token, cache_dir, quiet)
    report = verify(folder, manifest, role, progress=not quiet and not as_json, hub=hub,
                    algorithm=algorithm)
    if as_json:
        print_json({**report.to_json(), **({"signature": signed.to_json()} if signed else {})})
    else:
        if signed:
            say(f"signed   {signed.describe()} (verified: model.sig of the manifest's folder)")
        for name in report.missing:
            say(f"missing  {name}")
        for name in report.extra:
            say(f"extra    {name}")
        for m in report.differ:
            say(f"differs  {m.name}: {m.reason}: {m.actual.describe()}, "
                       f"expected {m.expected.describe()}")
    if not report.ok:
        raise VerificationError(
            f"{folder}: {report.failures} tensor(s) do not match the {role} in {manifest} "
            f"({report.matched} of {report.tensors} matched)"
        )
    if not as_json:
        say(f"OK  {folder} matches the {role} in {manifest}: {report.matched} tensors, "
                   f"model digest {report.algorithm} {report.model_digest}")


def _check_signer(manifest: str, pin):
    """The manifest's own folder's signature, checked before anything is hashed: it is what
    makes the manifest the publisher's."""
    from pathlib import Path

    from ..errors import InputError
    from ..integrity.signing import verify_folder

    path = Path(manifest).expanduser()
    if not path.exists():
        raise InputError(f"{manifest}: --signer-* options check a local folder's "
                         "model.sig: download the signed folder and give its path")
    return verify_folder(path if path.is_dir() else path.parent, pin)


@click.command("inspect", context_settings=HELP)
@click.argument("folder", metavar="DIR")
@click.option("--no-digest", is_flag=True,
              help="Read headers only; skip the model digest (which reads every byte).")
@click.option("-a", "--algorithm", type=ALGORITHM_CHOICE, default="blake3", show_default=True,
              help="The model digest's algorithm, as for checksum.")
@_json_option
@_quiet_option
@handle_errors
def inspect_cmd(folder: str, no_digest: bool, algorithm: str, as_json: bool, quiet: bool,
                token: str | None, revision: str | None, cache_dir: str | None) -> None:
    """Show what the checkpoint in DIR holds: format, files, dtypes, size, tensors, digest.

    \b
    Examples:
      deltamerge inspect ./llama-7b
      deltamerge inspect ./llama-7b --json --no-digest
      deltamerge inspect ./llama-7b --algorithm sha256
    """
    from ..integrity.checks import inspect  # deferred so --help and --version answer without loading torch

    (folder,) = with_revision([folder], revision)
    hub = hub_setup(token, cache_dir, quiet)
    r = inspect(folder, digest=not no_digest, progress=not quiet and not as_json, hub=hub,
                algorithm=algorithm)
    if as_json:
        print_json(r.to_json())
        return
    say(f"{folder}: {r.format}, {len(r.shards)} file(s)"
               + (f" indexed by {r.index}" if r.index else ""))
    say(f"  parameters  {r.parameters:,}")
    say(f"  bytes       {human(r.bytes)} of tensor data")
    for dtype, c in r.dtypes.items():
        say(f"  {dtype:<11} {c.tensors} tensors, {c.parameters:,} parameters")
    for s in r.shards:
        say(f"  file        {s.file} ({human(s.size)}, {s.tensors} tensors)")
    if r.model_digest:
        say(f"  digest      {r.algorithm} {r.model_digest}")
    width = max((len(t.name) for t in r.tensors), default=0)
    say("tensors:")
    for t in r.tensors:
        say(f"  {t.name:<{width}}  {t.dtype:<5} {str(list(t.shape)):<14} {t.file}")


@click.command("diff", context_settings=HELP)
@click.argument("a")
@click.argument("b")
@_json_option
@_quiet_option
@handle_errors
def diff_cmd(a: str, b: str, as_json: bool, quiet: bool, token: str | None,
             revision: str | None, cache_dir: str | None) -> None:
    """Compare the checkpoints A and B tensor by tensor, by value.

    Lists tensors on one side only, dtype and shape differences, and for each tensor whose
    values differ how many elements do and the largest absolute difference (in fp32). Formats
    and shard layouts may differ. Exits 0 when identical, 1 when they differ (as diff does).

    \b
    Example:
      deltamerge diff ./my-llama-7b ./llama-7b-from-the-hub
    """
    from ..integrity.checks import diff  # deferred so --help and --version answer without loading torch

    a, b = with_revision([a, b], revision)
    hub = hub_setup(token, cache_dir, quiet)
    r = diff(a, b, progress=not quiet and not as_json, hub=hub)
    if as_json:
        print_json(r.to_json())
    else:
        for name in r.only_a:
            say(f"only in {a}: {name}")
        for name in r.only_b:
            say(f"only in {b}: {name}")
        for d in r.layout:
            values = "" if d.max_abs_diff is None else f", max abs diff {d.max_abs_diff:.6g}"
            say(f"layout   {d.name}: {d.a_dtype}{list(d.a_shape)} vs "
                       f"{d.b_dtype}{list(d.b_shape)}{values}")
        for c in r.content:
            say(f"differs  {c.name}: {c.differing} of {c.elements} elements, "
                       f"max abs diff {c.max_abs_diff:.6g}")
        if r.identical:
            say(f"identical: {r.same} tensors with the same names, dtypes, shapes and values")
        else:
            largest = "" if r.max_abs_diff is None else f"; max abs diff {r.max_abs_diff:.6g}"
            say(f"{a} and {b} differ: {len(r.only_a)} only in A, {len(r.only_b)} only in B, "
                       f"{len(r.layout)} dtype/shape, {len(r.content)} values, "
                       f"{r.same} identical{largest}")
    if not r.identical:
        sys.exit(1)
