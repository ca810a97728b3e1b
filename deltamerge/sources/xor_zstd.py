"""A compressed XOR delta (``formats/xor_zstd.py``) read as the tensors it compresses.

Its files are safetensors files of compressed blobs; this checkpoint lists the decompressed
tensors instead, and reads rows by decompressing the blocks that hold them, one block at a
time (the last one kept, since the engine's blocks need not be the writer's). So the engine,
its hashing and the manifest's delta role see exactly what a plain XOR delta holds.

A block's frames are decompressed side by side on ``DECODE_THREADS`` threads (zstd lets go of
the GIL), each with its own decompressor: the large low planes then decode while the top
bytes are scattered into place, which keeps the smaller ``masked-top`` layout's apply near the
plain XOR delta's time. The bytes do not depend on it: each frame decodes alone.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..dtypes import itemsize
from ..errors import FormatError
from ..formats.xor_zstd import Block, Entry, decode, parse_index, zstd
from ..memory import address_view
from .checkpoint import Checkpoint, view_rows
from .safetensors import SafetensorsCheckpoint

DECODE_THREADS = 2


class ZstdXorCheckpoint(Checkpoint):
    format = "safetensors"

    def __init__(self, blobs: Checkpoint):
        if not isinstance(blobs, SafetensorsCheckpoint):
            raise FormatError(
                f"{blobs.path}: a compressed XOR delta is safetensors files, not {blobs.format}")
        super().__init__(blobs.layout)
        self.blobs = blobs
        self._zstd = zstd()
        self._local = threading.local()  # a decompressor per decoding thread
        self._pool: ThreadPoolExecutor | None = None
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
        if self._pool is None:
            self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="deltamerge-zstd")
        bound = dest.numel()  # no stream of the block holds more bytes than the block
        jobs: list[Future] = [self._pool.submit(self._inflate, raw[at:at + size], bound)
                              for at, size in zip(starts, block.sizes)]
        pending = iter(jobs)

        def inflate(nbytes: int) -> torch.Tensor:
            return self._plane(name, block, next(pending), nbytes)

        width = itemsize(entry.spec.dtype)
        try:
            decode(entry.layout, width, dest.numel() // width, inflate, dest)
        finally:
            for job in jobs:  # none outlives the frames' buffer, which the next block reuses
                job.cancel()
                if not job.cancelled():
                    job.exception()

    def _inflate(self, frame: memoryview, bound: int) -> bytes:
        """One frame decompressed on a decoding thread, with that thread's decompressor."""
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = self._zstd.ZstdDecompressor()
        return dctx.decompress(frame, max_output_size=bound)

    def _plane(self, name: str, block: Block, job: Future, nbytes: int) -> torch.Tensor:
        try:
            plane = job.result()
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
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.blobs.close()
