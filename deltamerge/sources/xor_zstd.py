"""A compressed XOR delta (``formats/xor_zstd.py``) read as the tensors it compresses.

Its files are safetensors files of compressed blobs; this checkpoint lists the decompressed
tensors instead, and reads rows by decompressing the blocks that hold them, one block at a
time (the last one kept, since the engine's blocks need not be the writer's). So the engine,
its hashing and the manifest's delta role see exactly what a plain XOR delta holds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..dtypes import itemsize
from ..errors import FormatError
from ..formats.xor_zstd import Block, Entry, decode, parse_index, zstd
from ..memory import address_view
from .checkpoint import Checkpoint, view_rows
from .safetensors import SafetensorsCheckpoint


class ZstdXorCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, blobs: Checkpoint):
        if not isinstance(blobs, SafetensorsCheckpoint):
            raise FormatError(
                f"{blobs.path}: a compressed XOR delta is safetensors files, not {blobs.format}")
        super().__init__(blobs.layout)
        self.blobs = blobs
        self._zstd = zstd()
        self._dctx = self._zstd.ZstdDecompressor()
        self.entries: dict[str, Entry] = {}
        for path, header in blobs.headers.items():
            specs = {n: blobs.specs[n] for n in header.tensors}
            self.entries.update(parse_index(path, header.metadata, specs))
        self.specs = {name: self.entries[name].spec for name in blobs.specs}
        self._frames = torch.empty(0, dtype=torch.uint8)
        self._cached: tuple[str, int] | None = None
        self._block = torch.empty(0, dtype=torch.uint8)

    def file_of(self, name: str) -> Path:
        return self.blobs.file_of(name)

    def header_length(self, path: Path) -> int | None:
        """The header holds the index, so its digest and the decompressed tensors' digests
        prove the file's content (not its compressed bytes: another level would differ)."""
        return self.blobs.header_length(path)

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """A block asked for whole (apply's blocks are make-delta's when both use one block size)
        is decoded straight into ``buffer``; other rows come from the cached block."""
        entry = self.entries[name]
        row_bytes = entry.spec.row_numel * itemsize(entry.spec.dtype)
        out = buffer[: (stop - start) * row_bytes]
        for i, block in enumerate(entry.blocks):
            lo, hi = max(start, block.r0), min(stop, block.r1)
            if lo >= hi:
                continue
            dest = out[(lo - start) * row_bytes:(hi - start) * row_bytes]
            if (lo, hi) == (block.r0, block.r1):
                self._decode(name, entry, block, dest)
            else:
                rows = self._decompressed(name, entry, i, block, row_bytes)
                dest.copy_(rows[(lo - block.r0) * row_bytes:(hi - block.r0) * row_bytes])
        return view_rows(buffer, entry.spec, stop - start)

    def _decompressed(self, name: str, entry: Entry, i: int, block: Block, row_bytes: int) -> torch.Tensor:
        """Block ``i`` of ``name``, decoded; kept until another block is asked for in part."""
        nbytes = (block.r1 - block.r0) * row_bytes
        if self._cached != (name, i):
            self._cached = None
            if self._block.numel() < nbytes:
                self._block = torch.empty(nbytes, dtype=torch.uint8)
            self._decode(name, entry, block, self._block[:nbytes])
            self._cached = (name, i)
        return self._block[:nbytes]

    def _decode(self, name: str, entry: Entry, block: Block, dest: torch.Tensor) -> None:
        """The block's frames read and decoded into ``dest`` (its bytes, elements interleaved)."""
        total = sum(block.sizes)
        if self._frames.numel() < total:
            self._frames = torch.empty(total, dtype=torch.uint8)
        frames = self.blobs.read_rows(name, block.offset, block.offset + total, self._frames)
        raw = address_view(frames.data_ptr(), total, frames)
        starts = [sum(block.sizes[:k]) for k in range(len(block.sizes))]
        streams = iter(zip(starts, block.sizes))

        def inflate(size: int) -> torch.Tensor:
            at, frame = next(streams)
            return self._plane(name, block, raw[at:at + frame], size)

        width = itemsize(entry.spec.dtype)
        decode(entry.layout, width, dest.numel() // width, inflate, dest)

    def _plane(self, name: str, block: Block, frame: memoryview, nbytes: int) -> torch.Tensor:
        try:
            plane = self._dctx.decompress(frame, max_output_size=nbytes)
        except self._zstd.ZstdError as exc:
            raise FormatError(
                f"{self.file_of(name)}: tensor {name!r}: the compressed frame of rows "
                f"{block.r0}-{block.r1} is corrupt ({exc}); download the delta again"
            ) from None
        if len(plane) != nbytes:
            raise FormatError(
                f"{self.file_of(name)}: tensor {name!r}: the compressed frame of rows "
                f"{block.r0}-{block.r1} holds {len(plane)} bytes, not {nbytes}; download the delta again"
            )
        if not plane:
            return torch.empty(0, dtype=torch.uint8)
        with warnings.catch_warnings():  # read-only bytes: the tensor is only copied from
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(plane, dtype=torch.uint8)

    def close(self) -> None:
        self.blobs.close()
