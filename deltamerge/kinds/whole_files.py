"""Deltas that are whole files XORed byte by byte: what the kinds that decode them share.

OpenAssistant's ``xor_codec.py`` files (``xor_files.py``) are XORed with the base's files of the
same names, OpenBuddy's ``.enc`` files (``enc.py``) with one repeating key. Either way a decoded
file is the publisher's file, byte for byte, whatever its format, so these kinds do not go through
the tensor stream: each payload streams through one reused chunk buffer, is XORed with its
:class:`Mask` and written to the partial folder, its md5 taken on the way; the payload's pages
are dropped from the page cache behind the reads. A decoded weight file must then be complete by
its own format, and the folder is published whole, or not at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, InputError, VerificationError, WorkError
from ..formats.files import LFS_POINTER_PREFIX
from ..formats.safetensors import read_header
from ..memory import drop_file_range
from ..progress import make_progress
from ..sinks.folder import check_out, discard, make_partial, partial_dir, publish

CHUNK = 16 * 1024 * 1024
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt")
ZIP_MAGIC = b"PK\x03\x04"
# llama.cpp's files (ggml, ggmf, ggjt, GGUF), also named .bin: not torch's, and not checked here.
GGML_MAGICS = (b"lmgg", b"fmgg", b"tjgg", b"GGUF")
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def is_weight_name(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


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


# -- what a payload is XORed with -----------------------------------------------------------------
class Mask(ABC):
    """The bytes a payload is XORed with, chunk after chunk."""

    bytes_read = 0

    @abstractmethod
    def take(self, n: int) -> memoryview:
        """The bytes the next ``n`` payload bytes are XORed with; fewer where the mask ends, the
        payload's bytes past them being XORed with zero (kept as they are)."""

    def finish(self) -> str | None:
        """Once the payload has ended: the md5 of every byte of the mask, where it keeps one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the mask's file."""


class FileMask(Mask):
    """Another file, read alongside the payload; with ``hash_all``, its md5 to the last byte."""

    def __init__(self, path: Path, buffer: bytearray, hash_all: bool):
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.buffer = memoryview(buffer)
        self.md5 = hashlib.md5() if hash_all else None

    def take(self, n: int) -> memoryview:
        got = read_full(self.file, self.buffer[:n])
        self.bytes_read += got
        if self.md5 is not None:
            self.md5.update(self.buffer[:got])
        return self.buffer[:got]

    def finish(self) -> str | None:
        if self.md5 is None:
            return None
        while got := read_full(self.file, self.buffer):
            self.md5.update(self.buffer[:got])
            self.bytes_read += got
        return self.md5.hexdigest()

    def close(self) -> None:
        self.file.close()


class RepeatingKey(Mask):
    """One key XORed with every chunk from its start: the chunk buffer is the key's size."""

    def __init__(self, key: bytearray):
        self.key = memoryview(key)

    def take(self, n: int) -> memoryview:
        assert n <= len(self.key), "payload chunks are at most the key's size"
        return self.key[:n]


# -- decoding -------------------------------------------------------------------------------------
def read_full(f, view: memoryview) -> int:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return done


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
    jobs: list[FileJob], folder: Path, buffer: bytearray,
    progress: bool | Callable[[int, int], None],
) -> list[Decoded]:
    """Decode every job into ``folder``; a decoded weight file must be complete by its format."""
    bar = make_progress(progress, sum(j.payload.stat().st_size for j in jobs), "decoding")
    decoded = []
    try:
        for job in jobs:
            try:
                decoded.append(decode_file(job, folder / job.name, buffer, bar.update))
            except OSError as exc:
                raise WorkError(f"{exc.filename or job.payload}: {exc.strerror or exc}") from None
            problem = format_problem(folder / job.name)
            if problem is not None:
                raise VerificationError(
                    f"{job.name}: the decoded file is not complete ({problem}): {job.cause}"
                )
    finally:
        bar.close()
    return decoded


def files_digest(decoded: list[Decoded]) -> str:
    """sha256 of the decoded files' md5 list (``md5  name`` lines, sorted): one comparable line."""
    listing = "".join(f"{d.md5}  {d.name}\n" for d in sorted(decoded, key=lambda d: d.name))
    return hashlib.sha256(listing.encode()).hexdigest()


# -- the result folder ----------------------------------------------------------------------------
def check_fresh(out: Path, force: bool) -> None:
    """OUT may be written, and no earlier run left its partial folder (these runs do not resume)."""
    check_out(out, force)
    if partial_dir(out).exists():
        raise InputError(
            f"{out}: an interrupted run left {partial_dir(out)}: delete that folder first"
        )


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """The partial folder beside ``out``: published when the block ends, discarded if it fails."""
    tmp = make_partial(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        discard(tmp)
        raise
