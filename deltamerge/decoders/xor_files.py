"""Decoding OpenAssistant ``xor_codec.py`` deltas: whole files XORed byte by byte with the base's files.

This is file-level, not tensor-level: the decoded files are the publisher's files, byte for byte,
whatever their format. The decoder's exact behaviour, reproduced here:

* every file of the delta folder (not its subfolders) is paired with the base file of the same
  name; the output has the payload's length, and base bytes past it are ignored, while payload
  bytes past the end of a shorter base are XORed with zero (copied as they are);
* ``added_tokens.json`` is first copied unencrypted; only when the base has one too is it then
  overwritten by the XOR, as the decoder's loop does;
* other files the base lacks are skipped (the decoder prints an exception and goes on). Here a
  missing base *weight* file (a shard or an index) is an error instead, since skipping it leaves
  an incomplete model; other skipped files are reported in the result's notes;
* the decoder's ``--compress`` gzips every XORed file under its plain name (only an
  ``added_tokens.json`` the base lacks stays plain, as copied): a payload whose first bytes are
  a gzip header (``1f 8b 08``, which no raw XOR of two files of one format starts with) is
  decompressed as it is read. A file named ``X.gz`` is gzip-compressed too and decodes to ``X``,
  paired with the base's ``X``. Raw files, as in the OA releases, are XORed as they are.

What is checked, and when:

* before anything is written, each base file the decode needs must exist and be complete by its
  own format. The size the publisher's base file had cannot be known from the delta alone (the
  payload has the *target's* length; the base may be shorter, as with an extended vocabulary, or
  longer), so what is checked is that a base file is exactly the size its own structure declares:
  a safetensors header accounts for every byte, a zip (``torch.save``) archive ends with its
  end-of-central-directory record. A truncated download or a Git LFS pointer is named then;
* while decoding, each decoded file's md5 is computed; with ``expect_md5`` (the release card's
  ``md5  filename`` list *of the decoded files*, which is what OA asks users to compare after
  decoding) every listed file must match, or a :class:`VerificationError` names it; a mismatch
  whose expected md5 is that of the base file says the list is the base's, not the result's;
* decoded weight files must be complete by their format too: a base that is not byte-identical
  to the publisher's usually breaks the archive's structure, and that is caught even without a
  checksum list.

Nothing is left at OUT on failure: the files are written to the partial folder and published
only when all checks pass. An interrupted run keeps that folder; ``--resume`` keeps the decoded
files that still hash to what its journal says and decodes the rest (``engine/lifecycle.py``,
``whole_files.decode_all``); ``--workers N`` decodes N files at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..engine.journal import fingerprint
from ..engine.lifecycle import partial_run
from ..errors import FormatError, InputError, NotFoundError, VerificationError
from ..kinds.masks import FileMask
from ..kinds.xor_files import is_gzip
from ..memory import peak_rss_bytes
from ..results import RESULT_RECORD, ApplyResult
from ..sinks.folder import write_json
from ..sources.folders import WEIGHT_SUFFIXES, is_weight_name, own_file
from ..version import __version__
from .whole_files import (
    CHUNK,
    Decoded,
    FileJob,
    decode_all,
    files_digest,
    files_layout,
    format_problem,
    resumed_note,
)

ADDED_TOKENS = "added_tokens.json"
_MD5_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")


@dataclass(frozen=True)
class Pair:
    """One file of the delta and what the decoder does with it."""

    payload: Path
    base: Path | None  # None: written as it is (added_tokens.json the base lacks)
    name: str  # the decoded file's name
    gz: bool


# -- what the delta folder holds ----------------------------------------------------------------
def pair_files(base: Path, delta: Path) -> tuple[list[Pair], list[str]]:
    """The decoder's pairing; returns the pairs and the names it skips (for the notes)."""
    names = sorted(p.name for p in delta.iterdir() if p.is_file())
    plain = set(names)
    pairs, skipped = [], []
    for name in names:
        gz = name.endswith(".gz")
        out_name = name[:-3] if gz else name
        if gz and out_name in plain:
            raise InputError(f"{delta}: both {out_name} and {name}: which one is the delta?")
        base_file = base / out_name
        if not out_name.endswith(WEIGHT_SUFFIXES):
            # Decoded with no format check (format_problem knows only weight files), so a linked
            # secret would reach OUT XORed with a file anyone with the base has.
            own_file(delta, delta / name)
            if base_file.is_file():
                own_file(base, base_file)
        if base_file.is_file():
            pairs.append(Pair(delta / name, base_file, out_name, gz or is_gzip(delta / name)))
        elif out_name == ADDED_TOKENS:
            pairs.append(Pair(delta / name, None, out_name, gz))
        elif is_weight_name(out_name):
            raise NotFoundError(
                f"{base_file}: missing from the base, but the delta has {name}: the decoded model "
                "would lack it (the base must hold the publisher's files, by the same names)"
            )
        else:
            skipped.append(name)
    if not any(is_weight_name(p.name) for p in pairs):
        raise InputError(f"{delta}: no weight files to decode against {base}")
    return pairs, skipped


# -- the base files ------------------------------------------------------------------------------
def check_bases(pairs: list[Pair]) -> None:
    """Refuse incomplete base files before anything is written."""
    for p in pairs:
        if p.base is None:
            continue
        problem = format_problem(p.base)
        if problem is not None:
            raise FormatError(
                f"{p.base}: base file of size {p.base.stat().st_size} is not complete: {problem}; "
                f"decoding {p.payload.name} needs the publisher's exact base file"
            )


# -- the release's md5 list -----------------------------------------------------------------------
def read_md5_list(path: Path) -> dict[str, str]:
    """``md5  name`` lines (``md5sum`` output, ``./`` or folder prefixes allowed), by file name."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the md5 list: {exc}") from None
    table: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _MD5_LINE.fullmatch(line)
        if not m:
            raise FormatError(f"{path}: line {i} is not `md5  filename`: {line[:80]!r}")
        name, md5 = Path(m.group(2).strip()).name, m.group(1).lower()
        if table.get(name, md5) != md5:
            raise InputError(f"{path}: {name} is listed twice with different md5 sums")
        table[name] = md5
    if not table:
        raise InputError(f"{path}: no `md5  filename` lines")
    return table


# -- decoding -------------------------------------------------------------------------------------
def _verify(
    decoded: list[Decoded], expected: dict[str, str], md5_list: Path, notes: list[str]
) -> bool:
    """Every listed file must have been decoded with its md5; True when every file was listed."""
    by_name = {d.name: d for d in decoded}
    for name, md5 in sorted(expected.items()):
        d = by_name.get(name)
        if d is None:
            raise VerificationError(f"{md5_list}: lists {name}, which the decode did not produce")
        if d.md5 != md5:
            why = (
                f"; {md5} is the md5 of the base file: {md5_list} lists the base's files, pass "
                "the list for the decoded files" if d.mask_md5 == md5
                else ": the base file is not byte-identical to the publisher's"
            )
            raise VerificationError(f"{name}: decoded md5 {d.md5} does not match {md5}{why}")
    unlisted = sorted(set(by_name) - set(expected))
    if unlisted:
        notes.append(f"not in {md5_list.name}, so not verified: {', '.join(unlisted)}")
    return not unlisted


def apply_xor_files(
    base: Path,
    delta: Path,
    out: Path,
    *,
    force: bool = False,
    expect_md5: Path | None = None,
    progress: bool | Callable[[int, int], None] = False,
    resume: bool = False,
    workers: int = 1,
) -> ApplyResult:
    """Decode an OpenAssistant-style XOR delta folder against ``base`` into ``out``, whose lock
    the caller holds (apply's ``locked_out``).

    ``workers`` files are decoded at once. ``resume=True`` finishes an interrupted run, keeping
    the decoded files that hash again to what its journal recorded.

    Returns an :class:`~deltamerge.results.ApplyResult` whose ``shards`` are the decoded files and
    whose ``model_digest`` is :func:`files_digest` (there are no tensors at this level).
    """
    start = time.monotonic()
    base, delta, out = Path(base), Path(delta), Path(out).expanduser()
    expected = read_md5_list(expect_md5) if expect_md5 is not None else None
    pairs, skipped = pair_files(base, delta)
    check_bases(pairs)
    notes = [f"skipped (not in the base, as xor_codec.py does): {', '.join(skipped)}"] if skipped else []
    jobs = [FileJob(
        p.payload, p.name, p.gz,
        None if p.base is None else  # a buffer per mask: files may decode at once
        lambda base_file=p.base: FileMask(base_file, bytearray(CHUNK), expected is not None),
        f"the base file {p.base} is not byte-identical to the publisher's",
    ) for p in pairs]
    inputs = [j.payload for j in jobs] + [p.base for p in pairs if p.base is not None]
    fp = fingerprint(inputs, {"kind": "xor-files", "version": __version__}, files_layout(jobs))
    with partial_run(out, fp, resume=resume, force=force, kept="the files decoded so far") as partial:
        tmp = partial.folder
        decoded = decode_all(jobs, partial, CHUNK, progress, workers, resume)
        notes += resumed_note(decoded)
        verified = _verify(decoded, expected, expect_md5, notes) if expected is not None else False
        digest = files_digest(decoded)
        write_json(tmp / RESULT_RECORD, {
            "deltamerge_version": __version__,
            "kind": "xor-files",
            "base": str(base),
            "delta": str(delta),
            "files": {d.name: {"md5": d.md5, "size": d.size} for d in decoded},
            "files_digest": digest,
            "verified_against": str(expect_md5) if verified else None,
        })
    return ApplyResult(
        out, ["xor-files"], 0, [d.name for d in decoded], sum(d.bytes_read for d in decoded),
        sum(d.size for d in decoded),
        time.monotonic() - start, peak_rss_bytes(), digest,
        publisher_digest=digest if verified else None, verified=verified, notes=notes,
        algorithm="sha256",  # of the md5 list: OpenAssistant published md5s, not tensors
    )


__all__ = [
    "apply_xor_files",
    "files_digest",
    "format_problem",
    "pair_files",
    "read_md5_list",
]
