"""A safetensors file whose tensors are known only as they are made (an extracted LoRA adapter).

A safetensors header lists every tensor before any data, but which tensors an extraction keeps
(the matrices and modules that changed) is known only once each has been read. So the bytes go
to a scratch file beside the result as they come, and :meth:`GatheredFile.finish` writes the
header and then copies them, in ``aligned_order`` (every tensor aligned to its item size), into
the file itself; the scratch file is removed. The copy is of the adapter only: the factors are
small, and the whole tensors it keeps (embeddings, norms) were read from the target anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.safetensors import aligned_order, build_header
from ..integrity.digest import TensorDigest, TensorHasher, raw_bytes
from ..memory import drop_file_range
from ..tensor_spec import TensorSpec

COPY_BYTES = 8 << 20  # bytes moved from the scratch file at a time


class GatheredFile:
    """Tensors appended in any order, written out as one safetensors file at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.scratch = path.with_name(f".{path.name}.parts")
        self._fd = os.open(self.scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._position = 0
        self._placed: list[tuple[TensorSpec, int]] = []

    def add(self, spec: TensorSpec, blocks: Iterable[torch.Tensor]) -> TensorDigest:
        """Append a tensor given as blocks of its rows, in order; its digest."""
        hasher = TensorHasher(spec)
        start = self._position
        for block in blocks:
            self._write(raw_bytes(block.contiguous()))
            hasher.update(block)
        if self._position - start != spec.nbytes:
            raise FormatError(f"{self.path}: internal error: tensor {spec.name!r} has "
                              f"{self._position - start} bytes, not {spec.nbytes}")
        self._placed.append((spec, start))
        return hasher.digest()

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for spec, _ in self._placed]

    def _write(self, data: memoryview) -> None:
        self._position = _pwrite_all(self._fd, data.cast("B"), self._position)

    def finish(self, metadata: dict[str, str]) -> int:
        """Header, then every tensor's bytes in aligned order; fsynced, the scratch removed.
        Returns the header's length (its 8-byte size included)."""
        where = dict(self._placed)
        order = aligned_order(self.specs)
        header = build_header(order, metadata)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            at = _pwrite_all(fd, memoryview(header), 0)
            for spec in order:
                start, left = where[spec], spec.nbytes
                while left:
                    chunk = os.pread(self._fd, min(left, COPY_BYTES), start)
                    if not chunk:
                        raise FormatError(f"{self.scratch}: truncated")
                    at = _pwrite_all(fd, memoryview(chunk), at)
                    start, left = start + len(chunk), left - len(chunk)
            os.fsync(fd)
            drop_file_range(fd, 0, at)
        finally:
            os.close(fd)
        self.abort()
        return len(header)

    def abort(self) -> None:
        """Close and remove the scratch file (the result, if written, stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.scratch.unlink(missing_ok=True)


def _pwrite_all(fd: int, view: memoryview, at: int) -> int:
    """Write all of ``view`` at ``at``; where it ends."""
    while view:
        done = os.pwrite(fd, view, at)
        at, view = at + done, view[done:]
    return at
