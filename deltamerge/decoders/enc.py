"""Decoding OpenBuddy's encrypted releases (``openbuddy-7b-*-enc``): files XORed with one 16 MiB key.

LLaMA's licence kept OpenBuddy from publishing its LLaMA-based weights, so each file ``X`` of a
release is published as ``X.enc``: ``X`` XORed with one repeating key, the first 16 MiB of Meta's
original LLaMA-7B ``consolidated.00.pth`` (not a Hugging Face conversion), whose md5 the release
fixes. What OpenBuddy's ``decrypt.py SEED_FILE FOLDER`` does (in github.com/OpenBuddy/OpenBuddy
from 2023-05-06 to 2024-04-26), reproduced byte for byte:

* the key is the first ``16 * 1024 * 1024`` bytes read from the seed file; unless their md5 is
  ``08cf0f43451cc4ae056e0b19e56c1fcf`` it stops before writing anything;
* every ``*.enc`` file at the top of the folder is read 16 MiB at a time and each chunk XORed with
  the key from its first byte (the last, shorter chunk with the key's first bytes); the result
  is written under the name without ``.enc``;
* nothing else: no checksum of the results; the release's other files (config, tokenizer) are
  left beside them.

Here the decoded files and the release's other files are written to OUT, built in the partial
folder and published whole: a wrong key is refused with both md5s before anything is written,
and a decoded weight file must be complete by its format. When the decoded files are weights,
OUT is a checkpoint and its model digest (what ``deltamerge checksum`` prints) is taken.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..engine.journal import fingerprint
from ..engine.lifecycle import partial_run
from ..errors import InputError
from ..integrity.digest import DEFAULT_ALGORITHM
from ..kinds.enc import KEY_SIZE, OPENBUDDY_KEY_MD5, SUFFIX, key_file, listed, read_key
from ..kinds.masks import RepeatingKey
from ..memory import peak_rss_bytes
from ..results import RESULT_RECORD, ApplyResult
from ..sinks.folder import write_json
from ..sources.folders import WEIGHT_SUFFIXES, own_file
from ..version import __version__
from .whole_files import (
    Decoded,
    FileJob,
    decode_all,
    files_digest,
    files_layout,
    is_torch_weights,
    resumed_note,
)


def enc_jobs(delta: Path, key: bytearray) -> tuple[list[FileJob], list[Path]]:
    """A job per ``X.enc`` (decoded as ``X``), and the other files, copied as they are."""
    files = listed(delta)
    encrypted = [p for p in files if p.name.endswith(SUFFIX)]
    if not encrypted:
        raise InputError(f"{delta}: no *{SUFFIX} files to decode")
    jobs = [FileJob(p, p.name.removesuffix(SUFFIX), False, lambda: RepeatingKey(key),
                    f"{p} is damaged or incomplete: download it again") for p in encrypted]
    decoded = {j.name for j in jobs}
    others = [p for p in files if not p.name.endswith(SUFFIX) and p.name not in decoded]
    # Copied, or decoded with no format check: they must be the folder's own, not links out.
    for p in others + [j.payload for j in jobs if not j.name.endswith(WEIGHT_SUFFIXES)]:
        own_file(delta, p)
    return jobs, others


def apply_enc(
    base: Path,
    delta: Path,
    out: Path,
    *,
    force: bool = False,
    key_md5: str = OPENBUDDY_KEY_MD5,
    progress: bool | Callable[[int, int], None] = False,
    model_digest: Callable[[Path], tuple[str, dict]],
    resume: bool = False,
    workers: int = 1,
) -> ApplyResult:
    """Decode an OpenBuddy ``-enc`` release with the key from ``base`` into ``out``, whose lock
    the caller holds (apply's ``locked_out``).

    ``key_md5`` is the md5 the key must have: OpenBuddy's unless a test makes its own key.
    ``model_digest(folder)`` digests a folder's tensors (the model digest, and the tensors'
    digests as a result record holds them): the entry point's checksum, since verifying is a
    stage above the kinds. It is called when a decoded file is weights a checkpoint reads;
    otherwise (llama.cpp's files) the result's ``model_digest`` is the files digest.
    """
    start = time.monotonic()
    base, delta, out = Path(base), Path(delta), Path(out).expanduser()
    source = key_file(base)
    key = read_key(source, key_md5)
    jobs, others = enc_jobs(delta, key)
    notes = [f"{p.name} is replaced by the decoded {p.name}{SUFFIX}" for p in listed(delta)
             if any(j.name == p.name for j in jobs)]
    fp = fingerprint([*(j.payload for j in jobs), source],
                     {"kind": "enc", "version": __version__, "key_md5": key_md5.lower()},
                     files_layout(jobs))
    with partial_run(out, fp, resume=resume, force=force, kept="the files decoded so far") as partial:
        tmp = partial.folder
        decoded: list[Decoded] = decode_all(jobs, partial, KEY_SIZE, progress, workers, resume)
        notes += resumed_note(decoded)
        for p in others:
            shutil.copyfile(p, tmp / p.name)
        weights = any(is_torch_weights(tmp / d.name) for d in decoded)
        tensors = model_digest(tmp) if weights else None
        listing = files_digest(decoded)
        digest = tensors[0] if tensors is not None else listing
        write_json(tmp / RESULT_RECORD, {
            "deltamerge_version": __version__,
            "kind": "enc",
            "key_md5": key_md5.lower(),
            "files": {d.name: {"md5": d.md5, "size": d.size} for d in decoded},
            "files_digest": listing,
            **({"algorithm": DEFAULT_ALGORITHM, "result": tensors[1]} if tensors is not None else {}),
        })
    copied = sum(p.stat().st_size for p in others)
    return ApplyResult(
        out, ["enc"], len(tensors[1]["tensors"]) if tensors is not None else 0,
        [d.name for d in decoded], KEY_SIZE + sum(d.bytes_read for d in decoded) + copied,
        sum(d.size for d in decoded) + copied,
        time.monotonic() - start, peak_rss_bytes(), digest, notes=notes,
        # the tensors' model digest (BLAKE3), or the files digest (sha256 of their md5 list)
        algorithm=DEFAULT_ALGORITHM if tensors is not None else "sha256",
    )


__all__ = ["apply_enc", "enc_jobs"]
