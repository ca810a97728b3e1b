"""Checksums of content, not of files: the same tensors give the same digests in any layout.

A tensor digest is the hash of the tensor's raw little-endian bytes in its stored dtype. A model
digest is the hash of one line per tensor, sorted by name:
``name \\t DTYPE \\t [d0,d1,...] \\t tensor-digest \\n`` (DTYPE as safetensors spells it).
The hash is BLAKE3 (manifest format 2, the default: several GB/s a core, so verifying costs
less than the disk) or sha256 (format 1, still read and checked); a digest is always computed
in the algorithm of the digest it is compared with. docs/manifest.md specifies both so other
tools can compute them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3
import torch

from .. import names
from ..dtypes import TORCH_TO_SAFETENSORS, itemsize
from ..memory import address_view, drop_file_range
from ..tensor_spec import TensorSpec

HASH_CHUNK = 16 * 1024 * 1024
ALGORITHMS = names.ALGORITHMS
BLAKE3, SHA256 = ALGORITHMS
DEFAULT_ALGORITHM = BLAKE3


class Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hash(algorithm: str = DEFAULT_ALGORITHM, data: bytes = b"") -> Hash:
    """A fresh hasher; both release the GIL on large inputs, so hashing stages overlap."""
    if algorithm == BLAKE3:
        return blake3.blake3(data)
    if algorithm == SHA256:
        return hashlib.sha256(data)
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def hash_bytes(data: bytes, algorithm: str = DEFAULT_ALGORITHM) -> str:
    return new_hash(algorithm, data).hexdigest()


@dataclass(frozen=True)
class TensorDigest:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    hexdigest: str
    algorithm: str = DEFAULT_ALGORITHM

    def to_json(self) -> dict:
        """As manifests write it: the digest under its algorithm's name."""
        return {"dtype": self.dtype, "shape": list(self.shape), self.algorithm: self.hexdigest}

    def describe(self) -> str:
        """For messages: ``blake3 0123456789abcdef… F16[4096, 4096]``."""
        return f"{self.algorithm} {self.hexdigest[:16]}… {self.dtype}{list(self.shape)}"


def model_digest(digests: Mapping[str, TensorDigest], algorithm: str = DEFAULT_ALGORITHM) -> str:
    """The digest of a set of tensors; every tensor digest must be in ``algorithm`` too."""
    h = new_hash(algorithm)
    for name in sorted(digests):
        d = digests[name]
        if d.algorithm != algorithm:
            raise ValueError(f"tensor {name!r}: a {d.algorithm} digest in a {algorithm} model digest")
        shape = "[" + ",".join(str(x) for x in d.shape) + "]"
        h.update(f"{name}\t{d.dtype}\t{shape}\t{d.hexdigest}\n".encode())
    return h.hexdigest()


class TensorHasher:
    """Hashes a tensor's bytes block by block, in row order, as they stream past."""

    def __init__(self, spec: TensorSpec, algorithm: str = DEFAULT_ALGORITHM):
        self.spec = spec
        self.algorithm = algorithm
        self._h = new_hash(algorithm)

    def update(self, block: torch.Tensor) -> None:
        self._h.update(raw_bytes(block))

    def digest(self) -> TensorDigest:
        return TensorDigest(
            TORCH_TO_SAFETENSORS[self.spec.dtype], self.spec.shape, self._h.hexdigest(),
            self.algorithm,
        )


class BytesHasher:
    """Hashes a tensor given as runs of bytes in order, whatever its type (a GGUF quantized one).

    A run that does not start where the last one ended is a bug in the writer that produced it:
    the digest would be of other bytes than the tensor's.
    """

    def __init__(
        self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int,
        algorithm: str = DEFAULT_ALGORITHM,
    ):
        self.name, self.dtype, self.shape, self.nbytes = name, dtype, shape, nbytes
        self.algorithm = algorithm
        self.position = 0
        self.skipped = False
        self._h = new_hash(algorithm)

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
        return TensorDigest(self.dtype, self.shape, self._h.hexdigest(), self.algorithm)


class RowSource(Protocol):
    """What hashing a stored tensor needs of a checkpoint (``sources.Checkpoint`` is one)."""

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor: ...
    def prefetch(self, name: str, start: int, stop: int) -> None: ...


def row_blocks(spec: TensorSpec, block_bytes: int, widest: int) -> Iterator[tuple[int, int]]:
    """Row ranges whose widest buffer stays within ``block_bytes`` (one row at least).

    ``widest`` is the largest item size the caller's work needs per element (the stored dtype's
    at least): 4 where blocks are also converted to fp32.
    """
    per_row = max(1, spec.row_numel * max(widest, itemsize(spec.dtype)))
    step = max(1, block_bytes // per_row)
    for r0 in range(0, spec.rows, step):
        yield r0, min(spec.rows, r0 + step)


def block_buffer(specs: list[TensorSpec], block_bytes: int, widest: int) -> torch.Tensor:
    """One reused read buffer large enough for the largest block of any of ``specs``."""
    largest = 1
    for spec in specs:
        r0, r1 = next(row_blocks(spec, block_bytes, widest), (0, 0))  # the first is the largest
        largest = max(largest, (r1 - r0) * spec.row_numel * itemsize(spec.dtype))
    return torch.empty(largest, dtype=torch.uint8)


def hash_tensor(
    ckpt: RowSource, spec: TensorSpec, block_bytes: int, buf: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None, algorithm: str = DEFAULT_ALGORITHM,
) -> TensorDigest:
    """One tensor's digest, read a block at a time into ``buf`` (made here when not given)."""
    buf = buf if buf is not None else block_buffer([spec], block_bytes, 1)
    hasher = TensorHasher(spec, algorithm)
    blocks = list(row_blocks(spec, block_bytes, 1))
    for i, (r0, r1) in enumerate(blocks):
        if i + 1 < len(blocks):
            ckpt.prefetch(spec.name, *blocks[i + 1])
        rows = ckpt.read_rows(spec.name, r0, r1, buf)
        hasher.update(rows)
        if progress is not None:
            progress(rows.nbytes)
    return hasher.digest()


def raw_bytes(block: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, without a copy (the hashers release the GIL on them)."""
    flat = block.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return address_view(flat.data_ptr(), flat.nbytes, flat)


def file_digest(path: Path, algorithm: str = DEFAULT_ALGORITHM, length: int | None = None) -> str:
    """The digest of a whole file (or its first ``length`` bytes), dropped from the page cache."""
    h = new_hash(algorithm)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while length is None or offset < length:
            want = HASH_CHUNK if length is None else min(HASH_CHUNK, length - offset)
            chunk = os.pread(fd, want, offset)
            if not chunk:
                break
            h.update(chunk)
            drop_file_range(fd, offset, len(chunk))
            offset += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


class FileHasher:
    """A file's digest fed with the ranges the merge reads anyway, in whatever order they come.

    Ranges that arrive in order cost nothing extra; gaps (a header, tensors read out of order)
    are read from the file to fill them, so the digest is always of the whole file. Format 1
    manifests need it; format 2 checks a delta's tensors instead (any order, nothing re-read).
    """

    def __init__(self, path: Path, algorithm: str = DEFAULT_ALGORITHM):
        self.path = path
        self.algorithm = algorithm
        self._h = new_hash(algorithm)
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
