"""Checksums of content, not of files: the same tensors give the same digests in any layout.

A tensor digest is the sha256 of the tensor's raw little-endian bytes in its stored dtype. A model
digest is the sha256 of one line per tensor, sorted by name:
``name \\t DTYPE \\t [d0,d1,...] \\t tensor-digest \\n`` (DTYPE as safetensors spells it).
docs/manifest.md specifies both so other tools can compute them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..memory import address_view, drop_file_range
from ..tensor_spec import TensorSpec

HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorDigest:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    sha256: str

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256}


def model_digest(digests: Mapping[str, TensorDigest]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        d = digests[name]
        shape = "[" + ",".join(str(x) for x in d.shape) + "]"
        h.update(f"{name}\t{d.dtype}\t{shape}\t{d.sha256}\n".encode())
    return h.hexdigest()


class TensorHasher:
    """Hashes a tensor's bytes block by block, in row order, as they stream past."""

    def __init__(self, spec: TensorSpec):
        self.spec = spec
        self._h = hashlib.sha256()

    def update(self, block: torch.Tensor) -> None:
        self._h.update(raw_bytes(block))

    def digest(self) -> TensorDigest:
        return TensorDigest(
            TORCH_TO_SAFETENSORS[self.spec.dtype], self.spec.shape, self._h.hexdigest()
        )


class BytesHasher:
    """Hashes a tensor given as runs of bytes in order, whatever its type (a GGUF quantized one).

    A run that does not start where the last one ended is a bug in the writer that produced it:
    the digest would be of other bytes than the tensor's.
    """

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int):
        self.name, self.dtype, self.shape, self.nbytes = name, dtype, shape, nbytes
        self.position = 0
        self.skipped = False
        self._h = hashlib.sha256()

    def update(self, offset: int, data: Sequence[memoryview]) -> None:
        self._advance(offset, data, hash_them=True)

    def skip(self, offset: int, data: Sequence[memoryview]) -> None:
        """Bytes another hasher hashes: only counted (a tensor is skipped whole, or not at all)."""
        self._advance(offset, data, hash_them=False)

    def _advance(self, offset: int, data: Sequence[memoryview], hash_them: bool) -> None:
        if offset != self.position:
            raise ValueError(
                f"tensor {self.name!r}: bytes from {offset} given, from {self.position} expected"
            )
        if self.position and self.skipped == hash_them:
            raise ValueError(f"tensor {self.name!r}: hashed in part only")
        self.skipped = not hash_them
        for buffer in data:
            if hash_them:
                self._h.update(buffer)
            self.position += len(buffer)

    @property
    def done(self) -> bool:
        return self.position == self.nbytes

    def digest(self) -> TensorDigest:
        return TensorDigest(self.dtype, self.shape, self._h.hexdigest())


def raw_bytes(block: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy (hashlib releases the GIL on them)."""
    flat = block.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return address_view(flat.data_ptr(), flat.nbytes, flat)


def file_sha256(path: Path) -> str:
    """sha256 of a whole file, read in chunks and dropped from the page cache behind us."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            chunk = os.pread(fd, HASH_CHUNK, offset)
            if not chunk:
                break
            h.update(chunk)
            drop_file_range(fd, offset, len(chunk))
            offset += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


class FileHasher:
    """sha256 of a file fed with the ranges the merge reads anyway, in whatever order they come.

    Ranges that arrive in order cost nothing extra; gaps (a header, tensors read out of order)
    are read from the file to fill them, so the digest is always of the whole file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._h = hashlib.sha256()
        self._pos = 0
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def _catch_up(self, until: int) -> None:
        while self._pos < until:
            chunk = os.pread(self._fd, min(HASH_CHUNK, until - self._pos), self._pos)
            if not chunk:
                break
            self._h.update(chunk)
            self._pos += len(chunk)

    def feed(self, offset: int, data: memoryview) -> None:
        if offset < self._pos:
            return
        self._catch_up(offset)
        if offset == self._pos:
            self._h.update(data)
            self._pos += len(data)

    def finish(self) -> str:
        try:
            self._catch_up(self.size)
        finally:
            os.close(self._fd)
        return self._h.hexdigest()
