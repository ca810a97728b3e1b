"""OpenAssistant ``xor_codec.py`` deltas: whole files XORed byte by byte with the base's files.

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
* a delta file named ``X.gz`` is gzip-compressed (the decoder's ``--compress``) and decodes to
  ``X``, paired with the base's ``X``. Files without the suffix are raw, as in the OA releases.

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
only when all checks pass. An interrupted run keeps that folder, with a journal of the files
decoded (size and md5); ``--resume`` hashes each of them again, keeps those that match and
decodes the rest. ``--workers N`` decodes N files at once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import faults
from ..errors import (
    FormatError,
    InputError,
    InterruptedRun,
    NotFoundError,
    VerificationError,
    WorkError,
)
from ..formats.files import LFS_POINTER_PREFIX
from ..formats.safetensors import read_header
from ..memory import drop_file_range, peak_rss_bytes
from ..progress import Progress, make_progress, step_bar
from ..results import RESULT_RECORD, ApplyResult
from ..sinks.folder import check_out, discard, partial_dir, publish, write_json
from ..version import __version__

CHUNK = 16 * 1024 * 1024
ADDED_TOKENS = "added_tokens.json"
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt")
ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_MD5_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")
JOURNAL = "journal.jsonl"  # in the partial folder, as the engine's journal is for shards


@dataclass(frozen=True)
class Pair:
    """One file of the delta and what the decoder does with it."""

    payload: Path
    base: Path | None  # None: written as it is (added_tokens.json the base lacks)
    name: str  # the decoded file's name
    gz: bool


# -- what the delta folder is ---------------------------------------------------------------------
def is_weight_name(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def looks_like_xor_files(folder: Path) -> bool:
    """A folder of XORed files, from the weight files' first bytes.

    XORing two zip archives (``torch.save``) zeroes their leading ``PK\\x03\\x04``; XORing two
    safetensors files zeroes the ``{`` that opens the header at byte 8. Neither happens in a
    real checkpoint, and gzip-compressed weight files are what ``--compress`` makes (named
    ``.gz`` by the user, or kept under the weights' own names as xor_codec.py does).
    """
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        name = path.name
        if not path.is_file():
            continue
        if name.endswith(".gz") and is_weight_name(name[:-3]):
            return True
        if name.endswith(WEIGHT_SUFFIXES):
            with open(path, "rb") as f:
                head = f.read(9)
            if head[:2] == GZIP_MAGIC:
                return True
            if name.endswith(".safetensors") and len(head) == 9 and head[8] == 0:
                return True
            if not name.endswith(".safetensors") and head[:4] == b"\0\0\0\0":
                return True
    return False


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
        if base_file.is_file():
            pairs.append(Pair(delta / name, base_file, out_name, gz))
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
    for others, nothing is known and None is returned.
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
            if not head.startswith(b"\x80"):
                return "neither a zip archive nor a pickle"
    return None


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
def _read_full(f, view: memoryview) -> int:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return done


@dataclass
class Decoded:
    name: str
    size: int
    md5: str
    base_md5: str | None
    bytes_read: int


def _decode(
    pair: Pair, dst: Path, bufs: tuple[bytearray, bytearray], hash_base: bool,
    progress: Callable[[int], None],
) -> Decoded:
    pbuf, bbuf = bufs
    md5 = hashlib.md5()
    base_md5 = hashlib.md5() if hash_base and pair.base is not None else None
    raw = open(pair.payload, "rb", buffering=0)  # noqa: SIM115 - closed below
    payload = gzip.GzipFile(fileobj=raw, mode="rb") if pair.gz else raw
    base = open(pair.base, "rb", buffering=0) if pair.base is not None else None  # noqa: SIM115
    out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = consumed = base_read = 0
    try:
        while True:
            n = _read_full(payload, memoryview(pbuf))
            if n == 0:
                break
            m = _read_full(base, memoryview(bbuf)[:n]) if base is not None else 0
            base_read += m
            if base_md5 is not None:
                base_md5.update(memoryview(bbuf)[:m])
            if m:
                p = torch.frombuffer(pbuf, dtype=torch.uint8, count=m)
                p.bitwise_xor_(torch.frombuffer(bbuf, dtype=torch.uint8, count=m))
            view = memoryview(pbuf)[:n]
            written = 0
            while written < n:
                written += os.write(out_fd, view[written:])
            md5.update(view)
            size += n
            pos = raw.tell()
            drop_file_range(raw.fileno(), consumed, pos - consumed)
            progress(pos - consumed)
            consumed = pos
        if base_md5 is not None and base is not None:
            while m := _read_full(base, memoryview(bbuf)):
                base_md5.update(memoryview(bbuf)[:m])
                base_read += m
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise FormatError(f"{pair.payload}: not a valid gzip file ({exc})") from None
    finally:
        os.close(out_fd)
        payload.close()
        raw.close()
        if base is not None:
            base.close()
    return Decoded(
        pair.name, size, md5.hexdigest(), base_md5.hexdigest() if base_md5 else None,
        consumed + base_read,
    )


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
                "the list for the decoded files" if d.base_md5 == md5
                else ": the base file is not byte-identical to the publisher's"
            )
            raise VerificationError(f"{name}: decoded md5 {d.md5} does not match {md5}{why}")
    unlisted = sorted(set(by_name) - set(expected))
    if unlisted:
        notes.append(f"not in {md5_list.name}, so not verified: {', '.join(unlisted)}")
    return not unlisted


def _likely_cause(pair: Pair) -> str:
    with open(pair.payload, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
    if compressed and not pair.gz:
        return (f"{pair.payload.name} looks gzip-compressed (xor_codec.py --compress): name it "
                f"{pair.payload.name}.gz")
    return f"the base file {pair.base} is not byte-identical to the publisher's"


def files_digest(decoded: list[Decoded]) -> str:
    """sha256 of the decoded files' md5 list (``md5  name`` lines, sorted): one comparable line."""
    listing = "".join(f"{d.md5}  {d.name}\n" for d in sorted(decoded, key=lambda d: d.name))
    return hashlib.sha256(listing.encode()).hexdigest()


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
    """Decode an OpenAssistant-style XOR delta folder against ``base`` into ``out``.

    ``workers`` files are decoded at once, each with its own buffers. Each decoded file is
    journaled in the partial folder with its size and md5; an interrupted run keeps the folder,
    and ``resume=True`` finishes it: every journaled file is hashed again and kept only if its
    md5 is the journal's, and the rest are decoded.

    Returns an :class:`~deltamerge.results.ApplyResult` whose ``shards`` are the decoded files and
    whose ``model_digest`` is :func:`files_digest` (there are no tensors at this level).
    """
    start = time.monotonic()
    base, delta, out = Path(base), Path(delta), Path(out).expanduser()
    check_out(out, force)
    expected = read_md5_list(expect_md5) if expect_md5 is not None else None
    pairs, skipped = pair_files(base, delta)
    if any(p.name == JOURNAL for p in pairs):
        raise InputError(f"{delta}: a file named {JOURNAL} would be decoded over the run's journal")
    check_bases(pairs)
    notes = [f"skipped (not in the base, as xor_codec.py does): {', '.join(skipped)}"] if skipped else []
    tmp, journal = _FileJournal.open(out, _fingerprint(pairs), resume)
    try:
        kept, reread = journal.recheck(tmp)
        if kept:
            notes.append(f"resumed: {len(kept)} decoded file(s) kept, each hashed again")
        todo = [p for p in pairs if p.name not in kept]
        bar = make_progress(progress, sum(p.payload.stat().st_size for p in todo), "decoding")
        try:
            fresh = _decode_all(todo, tmp, expected is not None, bar, journal, max(1, workers))
        finally:
            bar.close()
        decoded = [kept.get(p.name) or fresh[p.name] for p in pairs]
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
        publish(tmp, out)
        (out / JOURNAL).unlink(missing_ok=True)
    except (KeyboardInterrupt, WorkError) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise InterruptedRun(
            f"{reason}; the files decoded so far are kept in {tmp}: run the same command with "
            "--resume to finish"
        ) from exc
    except BaseException:
        discard(tmp)
        raise
    return ApplyResult(
        out, ["xor-files"], 0, [d.name for d in decoded],
        reread + sum(d.bytes_read for d in fresh.values()), sum(d.size for d in fresh.values()),
        time.monotonic() - start, peak_rss_bytes(), digest,
        publisher_digest=digest if verified else None, verified=verified, notes=notes,
    )


def _decode_all(
    pairs: list[Pair], tmp: Path, hash_base: bool, bar: Progress, journal: _FileJournal,
    workers: int,
) -> dict[str, Decoded]:
    """Decode ``pairs`` into ``tmp``, ``workers`` files at once; each is journaled when done.

    Reading, XOR (torch, which releases the GIL), md5 and writing of different files overlap
    on threads; memory is two chunk buffers per worker.
    """
    free: list[tuple[bytearray, bytearray]] = [
        (bytearray(CHUNK), bytearray(CHUNK)) for _ in range(min(workers, max(1, len(pairs))))
    ]
    lock = threading.Lock()
    stop = threading.Event()  # set when one file fails or the run is interrupted

    def tick(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        bar.update(n)

    def one(pair: Pair) -> Decoded:
        with lock:
            bufs = free.pop()
        try:
            bar.at(pair.name)
            try:
                d = _decode(pair, tmp / pair.name, bufs, hash_base, tick)
            except OSError as exc:
                raise WorkError(f"{exc.filename or pair.payload}: {exc.strerror or exc}") from None
        finally:
            with lock:
                free.append(bufs)
        problem = format_problem(tmp / pair.name)
        if problem is not None:
            raise VerificationError(f"{pair.name}: the decoded file is not complete ({problem}): "
                                    f"{_likely_cause(pair)}")
        with lock:
            journal.record(d)
        faults.reached("shard")
        return d

    if len(free) == 1:
        return {p.name: one(p) for p in pairs}
    pool = ThreadPoolExecutor(max_workers=len(free), thread_name_prefix="deltamerge-xor")
    try:
        futures = {p.name: pool.submit(one, p) for p in pairs}
        return {name: f.result() for name, f in futures.items()}
    except BaseException:
        stop.set()  # the other files stop at their next chunk
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Stopped(Exception):
    """Ends a decode whose run is stopping; never reaches the caller."""


def _fingerprint(pairs: list[Pair]) -> str:
    """What decides the decoded bytes: each payload's and base file's path, size and mtime."""
    h = hashlib.sha256(f"xor-files {__version__}\n".encode())
    for p in pairs:
        for path in (p.payload, p.base):
            if path is None:
                h.update(b"-\n")
                continue
            st = path.stat()
            h.update(f"{p.name}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class _FileJournal:
    """``journal.jsonl`` in the partial folder: the plan's fingerprint, then one line per file
    decoded (size, md5 and the base's md5). Lines are claims: :meth:`recheck` keeps a file only
    if hashing it again gives the journal's md5."""

    path: Path
    claims: dict[str, dict]

    @classmethod
    def open(cls, out: Path, fp: str, resume: bool) -> tuple[Path, _FileJournal]:
        tmp = partial_dir(out)
        if not tmp.exists():
            tmp.mkdir(parents=True)
            journal = cls(tmp / JOURNAL, {})
            journal._append({"fingerprint": fp})
            return tmp, journal
        if not resume:
            raise InputError(
                f"{out}: an interrupted run left {tmp}: run the same command with --resume to "
                "finish it, or delete that folder"
            )
        lines = (tmp / JOURNAL).read_text().splitlines() if (tmp / JOURNAL).is_file() else []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # a line cut short by the kill: that file is decoded again
        if not entries or not isinstance(entries[0], dict) or entries[0].get("fingerprint") != fp:
            raise InputError(
                f"{tmp}: was left by a run with other inputs; delete it, or run the original "
                "command with --resume"
            )
        claims = {e["name"]: e for e in entries[1:] if isinstance(e, dict) and isinstance(e.get("name"), str)}
        return tmp, cls(tmp / JOURNAL, claims)

    def recheck(self, tmp: Path) -> tuple[dict[str, Decoded], int]:
        """The journaled files whose size and md5 are still the journal's, and the bytes read."""
        files = {n: tmp / n for n in self.claims if (tmp / n).is_file() and not (tmp / n).is_symlink()}
        bar = step_bar(sum(p.stat().st_size for p in files.values()), "re-checking decoded files")
        kept, reread = {}, 0
        try:
            for name, path in files.items():
                bar.at(name)
                claim = self.claims[name]
                size = path.stat().st_size
                md5 = _file_md5(path, bar.update)
                reread += size
                if size == claim.get("size") and md5 == claim.get("md5"):
                    base_md5 = claim.get("base_md5")
                    kept[name] = Decoded(name, size, md5, base_md5 if isinstance(base_md5, str) else None, 0)
        finally:
            bar.close()
        return kept, reread

    def record(self, d: Decoded) -> None:
        self._append({"name": d.name, "size": d.size, "md5": d.md5, "base_md5": d.base_md5})

    def _append(self, obj: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(obj) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_md5(path: Path, progress: Callable[[int], None]) -> str:
    md5 = hashlib.md5()
    with open(path, "rb", buffering=0) as f:
        done = 0
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            drop_file_range(f.fileno(), done, len(chunk))
            done += len(chunk)
            progress(len(chunk))
    return md5.hexdigest()


__all__ = [
    "apply_xor_files",
    "files_digest",
    "format_problem",
    "looks_like_xor_files",
    "pair_files",
    "read_md5_list",
]
