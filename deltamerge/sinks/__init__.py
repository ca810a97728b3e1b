"""How results are written: the seam the engine writes shards through, and the sinks behind it.

The engine knows no file format. For each shard of the plan it asks its :class:`Sink` for a
:class:`ShardWriter` and hands it the shard's tensor bytes in plan order; the sink decides
what a file looks like around them (today ``safetensors``: a header first). What comes after
the engine (the index, the non-weight files, the partial folder and its atomic publish) lives
beside it here: ``safetensors``, ``aux``, ``folder``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from ..tensor_spec import TensorSpec


class ShardWriter(ABC):
    """One output file being written front to back; ``path`` names it in messages."""

    path: Path

    @abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append the next tensor bytes, in the order of the specs the shard was opened with."""

    @abstractmethod
    def close(self) -> None:
        """Finish the file (durably); a file shorter than its specs is an error, never a success."""

    @abstractmethod
    def abort(self) -> None:
        """Give up on the file after a failure; the partial folder it is in is kept or discarded."""


class Sink(ABC):
    """A result format: how one shard's tensors become one file."""

    @abstractmethod
    def open_shard(self, path: Path, specs: list[TensorSpec]) -> ShardWriter:
        """A writer for the shard file ``path`` that will hold ``specs``, in this order."""

    @abstractmethod
    def file_prefix(self, specs: list[TensorSpec]) -> bytes:
        """The bytes the file holds before the tensor bytes; the file is exactly these and then
        the tensor bytes in order, so make-delta hashes whole shard files off the writer."""
