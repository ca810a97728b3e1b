"""How results are written: the seam the engine writes through, and the sinks behind it.

The engine knows no file format. The plan groups the result's tensors into shards (the unit the
journal records); for each shard the engine asks its :class:`Sink` for a :class:`ShardWriter` and
hands it every block of rows with its tensor and row range, in plan order. The sink decides what
the files look like: ``safetensors`` writes each shard as one file, header first; ``gguf_sink``
and ``meta_sink`` convert the rows and write them at their planned places in files of their own
(the GGUF file set, Meta's ``consolidated.NN.pth``), which every shard of the plan writes into.

A writer returns what it put on disk (:class:`Written` pieces) when the tensors as written are
not the plan's own (``Sink.converts``), so the engine can hash the result as written. What comes
after the engine (the index, the non-weight files, the partial folder and its atomic publish)
lives beside it here: ``safetensors``, ``aux``, ``folder``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import WorkError
from ..integrity.digest import TensorDigest
from ..memory import drop_file_range
from ..tensor_spec import TensorSpec


class ShardLayout(Protocol):
    """A shard as a sink sees it: its name and its tensors (the plan's ``Shard``)."""

    filename: str

    @property
    def specs(self) -> list[TensorSpec]: ...


class FileBytes(Sequence[memoryview]):
    """Bytes a writer put in a file earlier, read back a chunk at a time as they are iterated.

    A writer that puts a tensor's bytes down out of byte order (a regrouped fused qkv, whose
    rows land all over the tensor) hands them to the hashing, which takes them in byte order,
    as these once the bytes before them are written: memory holds one chunk, not the tensor.
    Each chunk is dropped from the page cache once read. ``fd`` must stay open until they are.
    """

    CHUNK = 8 << 20

    def __init__(self, fd: int, offset: int, nbytes: int, chunk: int = CHUNK):
        self.fd, self.offset, self.nbytes, self.chunk = fd, offset, nbytes, chunk

    def __len__(self) -> int:
        return -(-self.nbytes // self.chunk)

    def __getitem__(self, i: int) -> memoryview:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        at = self.offset + i * self.chunk
        n = min(self.chunk, self.offset + self.nbytes - at)
        view, done = memoryview(bytearray(n)), 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], at + done)
            if not got:
                raise WorkError(f"internal error: the file ends at byte {at + done}, inside bytes "
                                "written earlier")
            done += got
        drop_file_range(self.fd, at, n)
        return view

    def __iter__(self) -> Iterator[memoryview]:
        return (self[i] for i in range(len(self)))


def run_bytes(data: Sequence[memoryview]) -> int:
    """The length of a run of buffers, without reading one that is read back (:class:`FileBytes`)."""
    return data.nbytes if isinstance(data, FileBytes) else sum(len(d) for d in data)


@dataclass(frozen=True)
class Written:
    """A run of bytes a writer put on disk: part of one tensor as the output format holds it.

    ``name``, ``dtype`` and ``shape`` are the tensor's in the output (a GGUF name and ggml type,
    say); ``offset`` is where the run starts in that tensor's bytes. Pieces of a tensor come in
    byte order. ``data`` may share memory with the rows given, so it is used before the block's
    buffers are reused; or it is bytes read back from the file as it is iterated
    (:class:`FileBytes`), so it is iterated once, by the hashing (``size`` counts it unread).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # the whole tensor's
    offset: int
    data: Sequence[memoryview]
    # Every piece of this tensor is the rows' own bytes, in order (a tensor kept as it is): its
    # digest is the plan tensor's, which the engine computes anyway.
    same_as_rows: bool = False

    @property
    def size(self) -> int:
        """The run's length in bytes."""
        return run_bytes(self.data)


# n -> an n-byte uint8 tensor that stays valid until the block has passed every stage.
Buffer = Callable[[int], torch.Tensor]


class Mismatch(Exception):
    """Why a re-checked shard is not kept (one line, for the run's notes)."""


class ShardWriter(ABC):
    """Writes one shard of the plan; ``path`` names it in messages."""

    path: Path
    size: int = 0  # bytes this shard put on disk, known after close (the journal records it)

    @abstractmethod
    def write_block(
        self, spec: TensorSpec, r0: int, r1: int, rows: torch.Tensor, buffer: Buffer
    ) -> list[Written]:
        """Rows ``r0:r1`` of tensor ``spec`` (C-contiguous, the spec's dtype); each tensor's rows
        come in order, tensors in the order of the shard's specs. ``buffer`` is where converted
        bytes go (reused block after block, so that writing allocates nothing). Returns what was
        written when the sink converts, else nothing."""

    @abstractmethod
    def close(self) -> None:
        """Make the shard's bytes durable; a shard with bytes missing is an error, never a success."""

    @abstractmethod
    def abort(self) -> None:
        """Give up after a failure; the partial folder it is in is kept or discarded."""


class Sink(ABC):
    """A result format: how the plan's shards become files."""

    #: False: the tensors as written are the plan's own, so their digests are the merge's.
    converts: bool = False
    #: What a shard of the plan is called in the run's notes.
    unit: str = "shard"
    #: True: the format checksums what it writes, in :meth:`checksum`, off the writing thread.
    checksums: bool = False

    @abstractmethod
    def open_shard(self, folder: Path, shard: ShardLayout) -> ShardWriter:
        """A writer for ``shard``, whose files are (or go) in ``folder``."""

    def file_prefix(self, specs: list[TensorSpec]) -> bytes:
        """The bytes a shard file holds before its tensor bytes, for sinks that write a shard as
        one file of its tensors' bytes in order (make-delta hashes whole files off the writer)."""
        raise NotImplementedError(f"{type(self).__name__} does not write a shard as one file")

    def checksum(self, pieces: Sequence[Written]) -> None:
        """The checksums the format records of ``pieces``, which a writer of this sink returned
        (a zip's CRC-32s). The engine calls it in a stage after the write's, in block order and
        before the shard is reported done, so that the writing thread only writes."""
        raise NotImplementedError(f"{type(self).__name__} records no checksums")

    def row_multiple(self, name: str) -> int:
        """Blocks of tensor ``name`` should hold a multiple of this many rows (whole heads)."""
        return 1

    def aux_files(self, source: Mapping[str, Path | bytes]) -> dict[str, Path | bytes]:
        """The non-weight files the result folder holds, from those the inputs give (``source``)."""
        return dict(source)

    def outputs(self) -> list[str]:
        """Files the sink writes that serve every shard; a resume keeps them (with a re-check)."""
        return []

    def record(self) -> dict:
        """What the result record says of the files beyond the options (a GGUF file's
        architecture and file type, which a card names and the options may leave to defaults)."""
        return {}

    def planned_bytes(self, shards: Sequence[ShardLayout], skip: set[str]) -> int:
        """Disk space the shards not in ``skip`` still need."""
        return sum(spec.nbytes for s in shards if s.filename not in skip for spec in s.specs)

    @abstractmethod
    def recheck(
        self, folder: Path, shard: ShardLayout, size: int, digests: Mapping[str, TensorDigest],
        written: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        """Read back what a journal says ``shard`` wrote (``size`` bytes; the plan's tensors'
        ``digests``; ``written``: the tensors as written, for a sink that converts) and hash it
        again; returns the digests computed now (of the tensors as written), or raises
        :class:`Mismatch`. ``advance`` counts the bytes read (and raises to stop)."""

    @abstractmethod
    def resume(self, folder: Path, kept: Mapping[str, Mapping[str, TensorDigest]]) -> None:
        """Before any shard is opened: the shards a re-check kept, by name, and their written
        tensors' digests (a sink whose files serve every shard continues them)."""

    @abstractmethod
    def finish(self, folder: Path) -> None:
        """After the last shard: complete the output's files (and what goes with them)."""

    @abstractmethod
    def abort(self) -> None:
        """After a failure: close whatever is open, leaving the files to a resume."""
