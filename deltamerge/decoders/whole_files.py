"""Deltas that are whole files XORed byte by byte: decoding them, file after file.

OpenAssistant's ``xor_codec.py`` files (``xor_files.py``) are XORed with the base's files of the
same names, OpenBuddy's ``.enc`` files (``enc.py``) with one repeating key (the masks,
``kinds/masks.py``). Either way a decoded file is the publisher's file, byte for byte, whatever
its format, so these deltas do not go through the tensor stream: each payload streams through
one reused chunk buffer, is XORed with its mask and written to the partial folder, its md5 taken
on the way; the payload's pages are dropped from the page cache behind the reads. A decoded
weight file must then be complete by its own format.

The run's life is the engine's (``engine/lifecycle.py``): the same partial folder and journal,
whose units here are the decoded files (each journaled with its size and md5 once written), the
same interruption path and publish, the same worker threads (``workers`` files at once). A
resumed run hashes every journaled file again and keeps those whose size and md5 are the
journal's, removes everything else, and decodes the rest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import faults
from ..engine.journal import JOURNAL_NAME, Entry
from ..engine.lifecycle import Partial
from ..engine.recheck import recheck_files
from ..engine.workers import Workers
from ..errors import FormatError, InputError, VerificationError, WorkError
from ..formats.files import LFS_POINTER_PREFIX
from ..formats.safetensors import read_header
from ..kinds.masks import Mask, read_full
from ..memory import drop_file_range
from ..progress import make_progress
from ..sources.folders import WEIGHT_SUFFIXES
from ..sources.meta import file_md5

CHUNK = 16 * 1024 * 1024
ZIP_MAGIC = b"PK\x03\x04"
# llama.cpp's files (ggml, ggmf, ggjt, GGUF), also named .bin: not torch's, and not checked here.
GGML_MAGICS = (b"lmgg", b"fmgg", b"tjgg", b"GGUF")
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


# -- whether a file is complete by its own format -------------------------------------------------
def _zip_problem(f: io.BufferedReader, size: int) -> str | None:
    """Why a zip archive is not exactly ``size`` bytes long, or None when it is."""
    tail_len = min(size, 22 + 65535)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(_EOCD)
    while pos >= 0:
        if pos + 22 <= len(tail):
            comment = struct.unpack_from("<H", tail, pos + 20)[0]
            if pos + 22 + comment == len(tail):
                break
        pos = tail.rfind(_EOCD, 0, pos)
    if pos < 0:
        return "no end-of-archive record at its end: truncated, or not the publisher's file"
    cd_size, cd_offset = struct.unpack_from("<II", tail, pos + 12)
    end_of_cd = size - tail_len + pos
    if pos >= 20 and tail[pos - 20 : pos - 16] == _ZIP64_LOCATOR:
        end_of_cd = struct.unpack_from("<Q", tail, pos - 12)[0]
        f.seek(end_of_cd)
        record = f.read(56)
        if len(record) < 56 or record[:4] != _ZIP64_EOCD:
            return "its zip64 end record is missing: damaged"
        cd_size, cd_offset = struct.unpack_from("<QQ", record, 40)
    elif cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        return "a zip64 archive without its zip64 records: damaged"
    if cd_offset + cd_size != end_of_cd:
        return (
            f"its central directory ends at byte {cd_offset + cd_size}, not at {end_of_cd} where "
            "the end record is: damaged"
        )
    return None


def format_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete file of the format its name and first bytes say, or None.

    Only self-describing formats are checked (safetensors, zip archives from ``torch.save``);
    for others, llama.cpp's included, nothing is known and None is returned.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(LFS_POINTER_PREFIX):
            return "a Git LFS pointer, not the file: run `git lfs pull`"
        if path.name.endswith(".safetensors"):
            try:
                read_header(path)
            except FormatError as exc:
                return str(exc).removeprefix(f"{path}: ")
            return None
        if path.name.endswith(WEIGHT_SUFFIXES):
            if size == 0:
                return "empty file"
            if head.startswith(ZIP_MAGIC):
                return _zip_problem(f, size)
            if head.startswith(GGML_MAGICS):
                return None
            if not head.startswith(b"\x80"):
                return "neither a zip archive nor a pickle"
    return None


def is_torch_weights(path: Path) -> bool:
    """A file a Checkpoint reads (safetensors, or a torch zip archive or pickle), by its bytes."""
    if path.name.endswith(".safetensors"):
        return True
    if not path.name.endswith(WEIGHT_SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith((ZIP_MAGIC, b"\x80"))


# -- decoding -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileJob:
    """One payload file and how it decodes."""

    payload: Path
    name: str  # the decoded file's name
    gz: bool  # the payload is gzip-compressed
    mask: Callable[[], Mask] | None  # None: written as it is
    cause: str  # what a decoded weight file that is not complete says about the inputs


@dataclass
class Decoded:
    name: str
    size: int
    md5: str
    mask_md5: str | None  # the md5 of the whole file the payload was XORed with, when hashed
    bytes_read: int
    kept: bool = False  # decoded by an earlier run, kept by this one's re-check


def decode_file(
    job: FileJob, dst: Path, buffer: bytearray, progress: Callable[[int], None]
) -> Decoded:
    """Stream ``job``'s payload into ``dst``, XORed with its mask, a ``buffer`` at a time."""
    md5 = hashlib.md5()
    raw = open(job.payload, "rb", buffering=0)  # noqa: SIM115 - closed below
    payload = gzip.GzipFile(fileobj=raw, mode="rb") if job.gz else raw
    mask = job.mask() if job.mask is not None else None
    out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = consumed = 0
    mask_md5 = None
    try:
        while n := read_full(payload, memoryview(buffer)):
            with_ = mask.take(n) if mask is not None else memoryview(b"")
            if len(with_):
                p = torch.frombuffer(buffer, dtype=torch.uint8, count=len(with_))
                p.bitwise_xor_(torch.frombuffer(with_, dtype=torch.uint8))
            view = memoryview(buffer)[:n]
            written = 0
            while written < n:
                written += os.write(out_fd, view[written:])
            md5.update(view)
            size += n
            pos = raw.tell()
            drop_file_range(raw.fileno(), consumed, pos - consumed)
            progress(pos - consumed)
            consumed = pos
        if mask is not None:
            mask_md5 = mask.finish()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise FormatError(f"{job.payload}: not a valid gzip file ({exc})") from None
    finally:
        os.close(out_fd)
        payload.close()
        raw.close()
        if mask is not None:
            mask.close()
    return Decoded(job.name, size, md5.hexdigest(), mask_md5,
                   consumed + (mask.bytes_read if mask is not None else 0))


def decode_all(
    jobs: list[FileJob], partial: Partial, chunk: int,
    progress: bool | Callable[[int, int], None], workers: int = 1, resume: bool = False,
) -> list[Decoded]:
    """Decode every job into the partial folder, ``workers`` files at once, each journaled when
    done; a decoded weight file must be complete by its format. On a resumed run the files a
    re-check keeps are not decoded again. Returns the decoded files in the jobs' order.

    Each worker has its own ``chunk``-byte buffer (and each mask its own); reading, XOR (torch
    releases the GIL), md5 and writing of different files overlap on the threads.
    """
    if any(j.name == JOURNAL_NAME for j in jobs):
        raise InputError(f"{jobs[0].payload.parent}: a file named {JOURNAL_NAME} would be decoded "
                         "over the run's journal")
    kept = _recheck(partial, jobs) if resume else {}
    todo = [j for j in jobs if j.name not in kept]
    bar = make_progress(progress, sum(j.payload.stat().st_size for j in todo), "decoding")
    pool = Workers(min(workers, len(todo)), "decode")
    buffers = [bytearray(chunk) for _ in range(pool.count)]
    lock = threading.Lock()

    def tick(n: int) -> None:
        pool.check()  # the other files stop at their next chunk once one fails
        bar.update(n)

    def one(job: FileJob) -> Decoded:
        with lock:
            buffer = buffers.pop()
        try:
            bar.at(job.name)
            try:
                d = decode_file(job, partial.folder / job.name, buffer, tick)
            except OSError as exc:
                raise WorkError(f"{exc.filename or job.payload}: {exc.strerror or exc}") from None
        finally:
            with lock:
                buffers.append(buffer)
        problem = format_problem(partial.folder / job.name)
        if problem is not None:
            raise VerificationError(
                f"{job.name}: the decoded file is not complete ({problem}): {job.cause}"
            )
        with lock:
            partial.journal.record(d.name, d.size, {}, extra={"md5": d.md5, "mask_md5": d.mask_md5})
        faults.reached("shard")
        return d

    try:
        fresh = dict(zip((j.name for j in todo), pool.map(one, todo)))
    finally:
        bar.close()
    return [kept.get(j.name) or fresh[j.name] for j in jobs]


def _recheck(partial: Partial, jobs: list[FileJob]) -> dict[str, Decoded]:
    """The journaled files whose size and md5 are still the journal's, hashed again now;
    everything else in the folder is removed, so only what was checked is published."""

    def holds(name: str, claim: Entry, path: Path, advance: Callable[[int], None]) -> bool:
        return path.stat().st_size == claim.size and file_md5(path, advance) == claim.extra.get("md5")

    kept = recheck_files(partial.folder, partial.journal, {j.name for j in jobs}, holds,
                         "re-checking decoded files")
    return {name: Decoded(name, e.size, str(e.extra["md5"]), _text(e.extra.get("mask_md5")), e.size,
                          kept=True) for name, e in kept.items()}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def resumed_note(decoded: list[Decoded]) -> list[str]:
    """The summary's line for a resumed decode: how many files it kept."""
    kept = sum(d.kept for d in decoded)
    return [f"resumed: {kept} decoded file(s) kept, each hashed again"] if kept else []


def files_layout(jobs: list[FileJob]) -> Iterator[str]:
    """The decode's files as the run's fingerprint takes them: each one's name and compression."""
    for job in jobs:
        yield f"{job.name}\0{int(job.gz)}\n"


def files_digest(decoded: list[Decoded]) -> str:
    """sha256 of the decoded files' md5 list (``md5  name`` lines, sorted): one comparable line."""
    listing = "".join(f"{d.md5}  {d.name}\n" for d in sorted(decoded, key=lambda d: d.name))
    return hashlib.sha256(listing.encode()).hexdigest()
