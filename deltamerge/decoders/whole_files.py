"""Deltas that are whole files XORed byte by byte: what the kinds that decode them share.

OpenAssistant's ``xor_codec.py`` files (``xor_files.py``) are XORed with the base's files of the
same names, OpenBuddy's ``.enc`` files (``enc.py``) with one repeating key. Either way a decoded
file is the publisher's file, byte for byte, whatever its format, so these kinds do not go through
the tensor stream: each payload streams through one reused chunk buffer, is XORed with its
:class:`Mask` and written to the partial folder, its md5 taken on the way; the payload's pages
are dropped from the page cache behind the reads. A decoded weight file must then be complete by
its own format, and the folder is published whole, or not at all.

The partial folder keeps a journal of the files decoded (``journal.jsonl``: the inputs'
fingerprint, then each file's name, size and md5), since kinds sit below the engine and its
shard journal. An interrupted run keeps the folder; ``resume=True`` hashes every journaled file
again and keeps those whose size and md5 are the journal's, removes everything else, and decodes
the rest, ``workers`` files at once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import faults
from ..errors import (
    FormatError,
    InputError,
    InterruptedRun,
    VerificationError,
    WorkError,
)
from ..formats.files import LFS_POINTER_PREFIX
from ..formats.safetensors import read_header
from ..memory import drop_file_range
from ..progress import Progress, make_progress, step_bar
from ..sinks.folder import (
    OutputTakenError,
    append_line,
    claim_partial,
    discard,
    missing_journal,
    publish,
    remove_entry,
)
from ..sources.meta import file_md5
from ..version import __version__

CHUNK = 16 * 1024 * 1024
JOURNAL = "journal.jsonl"  # in the partial folder, as the engine's journal is for shards
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
    jobs: list[FileJob], build: Build, chunk: int,
    progress: bool | Callable[[int, int], None], workers: int = 1,
) -> list[Decoded]:
    """Decode every job into the build's folder, ``workers`` files at once, each journaled when
    done; a decoded weight file must be complete by its format. On a resumed build the files a
    re-check keeps are not decoded again. Returns the decoded files in the jobs' order.

    Each worker has its own ``chunk``-byte buffer (and each mask its own); reading, XOR (torch
    releases the GIL), md5 and writing of different files overlap on the threads.
    """
    if any(j.name == JOURNAL for j in jobs):
        raise InputError(f"{jobs[0].payload.parent}: a file named {JOURNAL} would be decoded "
                         "over the run's journal")
    kept = build.recheck(jobs)
    todo = [j for j in jobs if j.name not in kept]
    bar = make_progress(progress, sum(j.payload.stat().st_size for j in todo), "decoding")
    try:
        fresh = _decode_parallel(todo, build, chunk, bar, max(1, workers))
    finally:
        bar.close()
    return [kept.get(j.name) or fresh[j.name] for j in jobs]


def _decode_parallel(
    jobs: list[FileJob], build: Build, chunk: int, bar: Progress, workers: int
) -> dict[str, Decoded]:
    buffers = [bytearray(chunk) for _ in range(min(workers, max(1, len(jobs))))]
    lock = threading.Lock()
    stop = threading.Event()  # set when one file fails or the run is interrupted

    def tick(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        bar.update(n)

    def one(job: FileJob) -> Decoded:
        with lock:
            buffer = buffers.pop()
        try:
            bar.at(job.name)
            try:
                d = decode_file(job, build.folder / job.name, buffer, tick)
            except OSError as exc:
                raise WorkError(f"{exc.filename or job.payload}: {exc.strerror or exc}") from None
        finally:
            with lock:
                buffers.append(buffer)
        problem = format_problem(build.folder / job.name)
        if problem is not None:
            raise VerificationError(
                f"{job.name}: the decoded file is not complete ({problem}): {job.cause}"
            )
        with lock:
            build.record(d)
        faults.reached("shard")
        return d

    if len(buffers) == 1:
        return {j.name: one(j) for j in jobs}
    pool = ThreadPoolExecutor(max_workers=len(buffers), thread_name_prefix="deltamerge-decode")
    try:
        futures = {j.name: pool.submit(one, j) for j in jobs}
        return {name: f.result() for name, f in futures.items()}
    except BaseException:
        stop.set()  # the other files stop at their next chunk
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """Ends a decode whose run is stopping; never reaches the caller."""


def files_digest(decoded: list[Decoded]) -> str:
    """sha256 of the decoded files' md5 list (``md5  name`` lines, sorted): one comparable line."""
    listing = "".join(f"{d.md5}  {d.name}\n" for d in sorted(decoded, key=lambda d: d.name))
    return hashlib.sha256(listing.encode()).hexdigest()


# -- the result folder and its journal -----------------------------------------------------------
def fingerprint(kind: str, jobs: list[FileJob], inputs: list[Path], options: dict) -> str:
    """What decides the decoded bytes: each payload and each other input file (path, size,
    mtime), and the options."""
    h = hashlib.sha256(f"{kind} {__version__}\n".encode())
    for job in jobs:
        h.update(f"{job.name}\0{int(job.gz)}\n".encode())
    for path in [j.payload for j in jobs] + inputs:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Build:
    """The partial folder of a decode, and the claims an earlier run's journal makes."""

    out: Path
    folder: Path
    claims: dict[str, dict] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # the files a re-check kept

    @classmethod
    def open(cls, out: Path, fp: str, resume: bool) -> Build:
        folder, left = claim_partial(out, resume)
        if not left:
            build = cls(out, folder)
            build._append({"fingerprint": fp})
            return build
        path = folder / JOURNAL
        if not path.is_file():
            raise missing_journal(folder, JOURNAL)
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a line cut short by the kill: that file is decoded again
        if not entries or not isinstance(entries[0], dict) or entries[0].get("fingerprint") != fp:
            raise InputError(f"{folder}: was left by a run with other inputs; delete it, or run "
                             "the original command with --resume")
        claims = {e["name"]: e for e in entries[1:]
                  if isinstance(e, dict) and isinstance(e.get("name"), str)}
        return cls(out, folder, claims)

    def recheck(self, jobs: list[FileJob]) -> dict[str, Decoded]:
        """The journaled files whose size and md5 are still the journal's, hashed again now;
        everything else in the folder is removed, so only what was checked is published."""
        names = {j.name for j in jobs}
        claims = {n: c for n, c in self.claims.items() if n in names
                  and (self.folder / n).is_file() and not (self.folder / n).is_symlink()}
        for entry in os.scandir(self.folder):
            if entry.name != JOURNAL and entry.name not in claims:
                remove_entry(self.folder / entry.name)
        bar = step_bar(sum((self.folder / n).stat().st_size for n in claims),
                       "re-checking decoded files")
        kept = {}
        try:
            for name, claim in claims.items():
                bar.at(name)
                path = self.folder / name
                size, md5 = path.stat().st_size, file_md5(path, bar.update)
                mask_md5 = claim.get("mask_md5")
                if size == claim.get("size") and md5 == claim.get("md5"):
                    kept[name] = Decoded(name, size, md5,
                                         mask_md5 if isinstance(mask_md5, str) else None, size)
                else:
                    remove_entry(path)
        finally:
            bar.close()
        self.kept = sorted(kept)
        return kept

    def note(self) -> list[str]:
        return [f"resumed: {len(self.kept)} decoded file(s) kept, each hashed again"] if self.kept else []

    def record(self, d: Decoded) -> None:
        self._append({"name": d.name, "size": d.size, "md5": d.md5, "mask_md5": d.mask_md5})

    def _append(self, obj: dict) -> None:
        append_line(self.folder / JOURNAL, obj)


@contextmanager
def building(out: Path, fp: str, resume: bool = False, force: bool = False) -> Iterator[Build]:
    """The partial folder beside ``out``: published when the block ends; kept for ``--resume``
    when the run is interrupted or fails while working, or when OUT was filled meanwhile
    (and ``force`` not given); discarded on any other failure."""
    build = Build.open(out, fp, resume)
    try:
        yield build
        publish(build.folder, out, force)
        (out / JOURNAL).unlink(missing_ok=True)
    except OutputTakenError:
        raise  # the finished partial folder stays, for --resume once OUT is moved away
    except (KeyboardInterrupt, WorkError) as exc:
        raise InterruptedRun.after(
            exc, f"the files decoded so far are kept in {build.folder}: run the same command "
            "with --resume to finish",
        ) from exc
    except BaseException:
        discard(build.folder)
        raise
