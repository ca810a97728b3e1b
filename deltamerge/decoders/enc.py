"""OpenBuddy's encrypted releases (``openbuddy-7b-*-enc``): files XORed with one 16 MiB key.

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

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, MismatchError, NotFoundError
from ..integrity.digest import DEFAULT_ALGORITHM
from ..memory import drop_file_range, peak_rss_bytes
from ..results import RESULT_RECORD, ApplyResult
from ..sinks.folder import check_out, write_json
from ..sources.folders import own_file
from ..version import __version__
from .whole_files import (
    WEIGHT_SUFFIXES,
    Decoded,
    FileJob,
    RepeatingKey,
    building,
    decode_all,
    files_digest,
    fingerprint,
    is_torch_weights,
    read_full,
)

SUFFIX = ".enc"
KEY_SIZE = 16 * 1024 * 1024  # decrypt.py's SEED_SIZE; also the decode's chunk, so keys align
KEY_FILE = "consolidated.00.pth"
OPENBUDDY_KEY_MD5 = "08cf0f43451cc4ae056e0b19e56c1fcf"


def _listed(folder: Path) -> list[Path]:
    """The folder's files as ``glob("*")`` sees them: top level, hidden names aside."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def looks_like_enc(folder: Path) -> bool:
    """A folder holding ``*.enc`` files (decrypt.py's ``glob("*.enc")``)."""
    return folder.is_dir() and any(p.name.endswith(SUFFIX) for p in _listed(folder))


def key_file(base: Path) -> Path:
    """``consolidated.00.pth``: BASE itself, or in the folder BASE names (``LLaMA/7B``)."""
    if base.is_file():
        return base
    if (base / KEY_FILE).is_file():
        return base / KEY_FILE
    hint = f": pass {base / '7B'}" if (base / "7B" / KEY_FILE).is_file() else ""
    raise NotFoundError(
        f"{base}: no {KEY_FILE}{hint} (OpenBuddy's key is the first 16 MiB of Meta's original "
        f"LLaMA-7B {KEY_FILE}: BASE is that file, or the folder holding it, e.g. LLaMA/7B)"
    )


def read_key(path: Path, expected_md5: str) -> bytearray:
    """The first 16 MiB of ``path``, refused unless their md5 is ``expected_md5``."""
    key = bytearray(KEY_SIZE)
    with open(path, "rb", buffering=0) as f:
        got = read_full(f, memoryview(key))
        drop_file_range(f.fileno(), 0, got)
    md5 = hashlib.md5(memoryview(key)[:got]).hexdigest()
    if got < KEY_SIZE or md5 != expected_md5.lower():
        size = f"it has only {got} bytes, " if got < KEY_SIZE else ""
        raise MismatchError(
            f"{path}: not the key: {size}its first 16 MiB have md5 {md5}, the key's is "
            f"{expected_md5.lower()}: BASE must be Meta's original LLaMA-7B {KEY_FILE} (not a "
            f"Hugging Face conversion, nor another size's)"
        )
    return key


def enc_jobs(delta: Path, key: bytearray) -> tuple[list[FileJob], list[Path]]:
    """A job per ``X.enc`` (decoded as ``X``), and the other files, copied as they are."""
    files = _listed(delta)
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
    """Decode an OpenBuddy ``-enc`` release with the key from ``base`` into ``out``.

    ``key_md5`` is the md5 the key must have: OpenBuddy's unless a test makes its own key.
    ``model_digest(folder)`` digests a folder's tensors (the model digest, and the tensors'
    digests as a result record holds them): the entry point's checksum, since verifying is a
    stage above the kinds. It is called when a decoded file is weights a checkpoint reads;
    otherwise (llama.cpp's files) the result's ``model_digest`` is the files digest.
    """
    start = time.monotonic()
    base, delta, out = Path(base), Path(delta), Path(out).expanduser()
    check_out(out, force)
    source = key_file(base)
    key = read_key(source, key_md5)
    jobs, others = enc_jobs(delta, key)
    notes = [f"{p.name} is replaced by the decoded {p.name}{SUFFIX}" for p in _listed(delta)
             if any(j.name == p.name for j in jobs)]
    fp = fingerprint("enc", jobs, [source], {"key_md5": key_md5.lower()})
    with building(out, fp, resume, force) as build:
        tmp = build.folder
        decoded: list[Decoded] = decode_all(jobs, build, KEY_SIZE, progress, workers)
        notes += build.note()
        for p in others:
            shutil.copyfile(p, tmp / p.name)
        weights = any(is_torch_weights(tmp / d.name) for d in decoded)
        tensors = model_digest(tmp) if weights else None
        listed = files_digest(decoded)
        digest = tensors[0] if tensors is not None else listed
        write_json(tmp / RESULT_RECORD, {
            "deltamerge_version": __version__,
            "kind": "enc",
            "key_md5": key_md5.lower(),
            "files": {d.name: {"md5": d.md5, "size": d.size} for d in decoded},
            "files_digest": listed,
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


__all__ = ["OPENBUDDY_KEY_MD5", "apply_enc", "key_file", "looks_like_enc", "read_key"]
