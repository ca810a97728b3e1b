"""The ``torch.save`` zip archive (``.pth``, ``.bin``), written as a stream that holds no tensor.

``torch.save`` needs every tensor in memory. Here the pickle comes from names, dtypes and
shapes alone (:mod:`.torch_pickle`), and every record's place follows from the sizes, so all
local headers are written when the file is opened and each storage's bytes go straight to
their offset (``pwrite``), in pieces of any size and in any order. Like torch's writer, local
headers leave CRC and sizes at zero (flag bit 3) for a data descriptor after the data to hold;
the CRC-32s are computed on the bytes as they pass (:mod:`.torch_zip_sums`), so nothing written
is patched: the descriptors and the central directory are written by :meth:`TorchZipWriter.close`.

The file is byte for byte what ``torch.save(state_dict, path)`` writes (torch 2.13 on Linux; its
writer is miniz): records in torch's order (``data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/0``..., ``version``, ``.data/serialization_id``),
each record's data aligned to 64 bytes by an ``FB`` extra field of ``Z`` padding (what lets
``torch.load(mmap=True)`` map a storage where it lies), zip64 fields only where a size or an
offset reaches 4 GiB, a zip64 end record always, no timestamps.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import itemsize
from ..errors import UnsupportedError, WorkError
from ..memory import WriteBehind, drop_file_range
from .torch_pickle import TensorLike, state_dict_pickle
from .torch_zip_sums import CrcRanges, serialization_id

ALIGNMENT = 64  # torch's default ``storage_alignment``
# A size or an offset from this one up is written in a zip64 extra field (miniz's rule).
ZIP64_LIMIT = 0xFFFFFFFF
VERSION = b"3\n"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_IOV_MAX = 1024

Bytes = bytes | bytearray | memoryview


def archive_name_for(path: Path) -> str:
    """The folder torch puts the records in: the file's name without its last extension.

    torch writes a path that is not ASCII through a Python stream, and then names it ``archive``;
    ``torch.load`` accepts any name.
    """
    if not str(path).isascii():
        return "archive"
    stem = path.name.rsplit(".", 1)[0] if "." in path.name else path.name
    if not stem:
        raise UnsupportedError(f"{path}: torch cannot name an archive after this file name")
    return stem


def _field32(value: int) -> int:
    return value if value < ZIP64_LIMIT else 0xFFFFFFFF


@dataclass(frozen=True)
class _Record:
    """One file of the archive, placed: where its header and data start, and how big it is."""

    name: str  # inside the archive's folder: "data.pkl", "data/0"...
    full_name: bytes  # "<archive>/<name>"
    header: int
    data: int
    size: int

    @classmethod
    def place(cls, name: str, archive: str, size: int, header: int) -> _Record:
        """torch's ``getPadding``: the data of every record starts on a multiple of 64."""
        full_name = f"{archive}/{name}".encode()
        start = header + 30 + len(full_name) + 4
        if size >= ZIP64_LIMIT or header >= ZIP64_LIMIT:
            start += 4 + (16 if size >= ZIP64_LIMIT else 0) + (8 if header >= ZIP64_LIMIT else 0)
        return cls(name, full_name, header, start + (-start % ALIGNMENT), size)

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_LIMIT or self.header >= ZIP64_LIMIT

    @property
    def end(self) -> int:
        """After the data descriptor, which miniz leaves out for an empty record."""
        return self.data + self.size + (0 if not self.size else 24 if self.zip64 else 16)

    @property
    def flags(self) -> int:
        return 0x0808 if self.size else 0x0800  # UTF-8 name; sizes in a data descriptor

    def zip64_extra(self, local: bool) -> bytes:
        """Sizes (uncompressed, compressed) and the header's offset, those that reach the limit.

        miniz writes the local header before the data, its compressed size still 0.
        """
        fields = [self.size, 0 if local else self.size] if self.size >= ZIP64_LIMIT else []
        fields += [self.header] if self.header >= ZIP64_LIMIT else []
        return struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""

    def local_header(self) -> bytes:
        zip64 = self.zip64_extra(local=True)
        padding = self.data - (self.header + 30 + len(self.full_name) + len(zip64) + 4)
        head = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 0, self.flags, 0, 0, 0, 0, 0, 0,
            len(self.full_name), len(zip64) + 4 + padding,
        )  # fmt: skip
        return head + self.full_name + zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding

    def descriptor(self, crc: int) -> bytes:
        if not self.size:
            return b""
        sizes = struct.pack("<QQ" if self.zip64 else "<II", self.size, self.size)
        return _DESCRIPTOR_SIG + struct.pack("<I", crc) + sizes

    def central_header(self, crc: int) -> bytes:
        zip64 = self.zip64_extra(local=False)
        head = struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, self.flags, 0, 0, 0, crc,
            _field32(self.size), _field32(self.size), len(self.full_name), len(zip64),
            0, 0, 0, 0, _field32(self.header),
        )  # fmt: skip
        return head + self.full_name + zip64


class ArchiveLayout:
    """Every record's place, the leading records' bytes and the file's size, from the tensors."""

    def __init__(self, tensors: Sequence[TensorLike], archive_name: str):
        self.leading: dict[str, bytes] = {
            "data.pkl": state_dict_pickle(tensors),
            ".format_version": b"1",
            ".storage_alignment": str(ALIGNMENT).encode(),
            "byteorder": sys.byteorder.encode(),
        }
        self.records: list[_Record] = []  # in the file's order
        for name, data in self.leading.items():
            self.records.append(self._next(name, archive_name, len(data)))
        self.storages: dict[str, _Record] = {}  # by tensor name
        for index, spec in enumerate(tensors):
            nbytes = math.prod(spec.shape) * itemsize(spec.dtype)
            self.storages[spec.name] = self._next(f"data/{index}", archive_name, nbytes)
            self.records.append(self.storages[spec.name])
        self.version = self._next("version", archive_name, len(VERSION))
        self.records.append(self.version)
        self.serialization_id = self._next(".data/serialization_id", archive_name, 40)
        self.records.append(self.serialization_id)
        self.central_directory = self.records[-1].end
        self.central_size = sum(len(r.central_header(0)) for r in self.records)
        self.size = self.central_directory + self.central_size + 56 + 20 + 22

    def _next(self, name: str, archive: str, size: int) -> _Record:
        return _Record.place(name, archive, size, self.records[-1].end if self.records else 0)

    def end_records(self) -> bytes:
        """The zip64 end of central directory record and locator, then the classic end record."""
        count, start, size = len(self.records), self.central_directory, self.central_size
        return (
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, size, start)
            + struct.pack("<IIQI", 0x07064B50, 0, start + size, 1)
            + struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF), 0,
            )
        )  # fmt: skip


def _as_bytes(data: Bytes) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _buffers(data: Bytes | Sequence[Bytes]) -> list[memoryview]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [_as_bytes(data)]
    return [_as_bytes(b) for b in data]


class TorchZipWriter:
    """Writes one ``torch.save`` archive of ``tensors`` (C-contiguous), storage bytes in any order.

    Every byte of every tensor is written exactly once through :meth:`write`, in pieces of any
    size and order; :meth:`close` refuses an archive with a byte missing. Nothing of the data
    is held: memory is one range entry per tensor written in order (one per gap otherwise).

    ``kept`` resumes an archive an earlier run left: the storages named (by tensor, with the
    CRC-32 and first bytes read back from the file now) are taken as written, so the file is
    not truncated; everything else, the leading records and every header included, is written
    again.
    """

    def __init__(
        self, path: Path, tensors: Sequence[TensorLike], archive_name: str | None = None,
        kept: Mapping[str, tuple[int, bytes]] | None = None,
    ):
        self.path = path
        self.layout = ArchiveLayout(tensors, archive_name or archive_name_for(path))
        self._ranges = {
            name: CrcRanges(record.size, f"{path}: tensor {name!r}")
            for name, record in self.layout.storages.items()
        }
        self._high = 0  # the furthest byte written: write-behind follows it, close checks it
        truncate = 0 if kept else os.O_TRUNC
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | truncate, 0o644)
        self._open = True
        self._behind = WriteBehind(self.fd)
        try:
            for name, (crc, head) in (kept or {}).items():
                self._ranges[name].adopt(crc, head)
            if kept:
                os.ftruncate(self.fd, self.layout.size)
            for record, data in zip(self.layout.records, self.layout.leading.values()):
                chunk = record.local_header() + data + record.descriptor(zlib.crc32(data))
                self._pwrite([memoryview(chunk)], record.header, behind=False)
            for record in self.layout.storages.values():
                self._pwrite([memoryview(record.local_header())], record.header, behind=False)
        except BaseException:
            self.abort()
            raise

    @property
    def size(self) -> int:
        return self.layout.size

    def write(
        self, name: str, offset: int, data: Bytes | Sequence[Bytes], checksum: bool = True
    ) -> None:
        """Bytes of tensor ``name`` from byte ``offset`` of its data. A sequence of buffers is one
        contiguous run, written by one gathering ``pwritev`` (the rows of a column slice, say).

        ``checksum=False`` leaves the run's CRC-32 to a later :meth:`checksum` of the same bytes,
        from another thread, so that the writing thread only writes."""
        record = self.layout.storages.get(name)
        if record is None:
            raise WorkError(f"internal error: {self.path}: no tensor {name!r} in this archive")
        buffers = _buffers(data)
        if checksum:
            self._ranges[name].add(offset, buffers)
        self._pwrite(buffers, record.data + offset)

    def checksum(self, name: str, offset: int, data: Bytes | Sequence[Bytes]) -> None:
        """Take the CRC-32 of a run written with ``checksum=False`` (before :meth:`close`, which
        refuses a record with a byte unaccounted for)."""
        self._ranges[name].add(offset, _buffers(data))

    def _pwrite(self, buffers: list[memoryview], offset: int, behind: bool = True) -> None:
        """``behind``: push what is before the end of this write to disk (the storages come in
        order; the headers written ahead of them must not move that point past their data)."""
        pending, first = [b for b in buffers if len(b)], 0
        while first < len(pending):
            written = os.pwritev(self.fd, pending[first : first + _IOV_MAX], offset)
            offset += written
            while first < len(pending) and written >= len(pending[first]):
                written -= len(pending[first])
                first += 1
            if written:
                pending[first] = pending[first][written:]
        self._high = max(self._high, offset)
        if behind:
            self._behind.advance(offset)

    def close(self, sync: bool = True) -> None:
        """Write the descriptors, torch's last two records and the central directory; fsync."""
        try:
            self._finish()
            if sync:
                os.fsync(self.fd)
            drop_file_range(self.fd, 0, self.layout.size)
        finally:
            self.abort()

    def _finish(self) -> None:
        layout = self.layout
        crcs = [zlib.crc32(data) for data in layout.leading.values()]  # per record, in order
        seen = list(crcs)  # the CRC-32s torch's writer took from its writes, for the id
        for name, record in layout.storages.items():
            crcs.append(self._ranges[name].crc())
            head = self._ranges[name].head
            if record.size >= len(head) and head[:4] == _DESCRIPTOR_SIG:
                seen.append(int.from_bytes(head[4:8], "little"))  # torch takes such data for one
            if record.size:
                seen.append(crcs[-1])
                self._pwrite([memoryview(record.descriptor(crcs[-1]))], record.data + record.size)
        seen.append(zlib.crc32(VERSION))
        ident = serialization_id([r.name for r in layout.records[:-1]], seen)
        tail = bytearray()
        for record, data in ((layout.version, VERSION), (layout.serialization_id, ident)):
            crcs.append(zlib.crc32(data))
            tail += record.local_header() + data + record.descriptor(crcs[-1])
        tail += b"".join(r.central_header(crc) for r, crc in zip(layout.records, crcs, strict=True))
        self._pwrite([memoryview(tail + layout.end_records())], layout.version.header)
        if self._high != layout.size:
            raise WorkError(f"internal error: {self.path}: wrote {self._high} of {layout.size} bytes")

    def abort(self) -> None:
        """Close the file, once: the descriptor's number may belong to another file afterwards."""
        if self._open:
            self._open = False
            try:
                os.close(self.fd)
            except OSError:
                pass
