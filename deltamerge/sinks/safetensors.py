"""Results as sharded safetensors: the sink the engine writes through, and the index after it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..errors import FormatError
from ..formats.safetensors import build_header
from ..memory import WriteBehind, drop_file_range
from ..tensor_spec import TensorSpec
from . import ShardWriter, Sink
from .folder import write_json


class StreamingWriter(ShardWriter):
    """Writes one safetensors file front to back: header first, then tensor bytes in order.

    Shapes and dtypes are known from the plan before any data exists, so the header can be
    written first and no tensor ever needs to be held whole.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None):
        self.path = path
        self.specs = specs
        header = build_header(specs, metadata)
        self.expected = len(header) + sum(s.nbytes for s in specs)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.position = 0
        self._behind = WriteBehind(self.fd)
        self.write(header)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self.fd, view, self.position)
            self.position += written
            view = view[written:]
        self._behind.advance(self.position)

    def close(self, sync: bool = True) -> None:
        """Finish the file; a short file is a bug in the caller, never a silent success."""
        try:
            if self.position != self.expected:
                raise FormatError(
                    f"{self.path}: internal error: wrote {self.position} of {self.expected} bytes"
                )
            if sync:
                os.fsync(self.fd)
            drop_file_range(self.fd, 0, self.position)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class SafetensorsSink(Sink):
    """Shards as safetensors files, with ``metadata`` in each header (``{"format": "pt"}``)."""

    def __init__(self, metadata: dict[str, str] | None = None):
        self.metadata = metadata if metadata is not None else {"format": "pt"}

    def open_shard(self, path: Path, specs: list[TensorSpec]) -> StreamingWriter:
        return StreamingWriter(path, specs, self.metadata)

    def file_prefix(self, specs: list[TensorSpec]) -> bytes:
        return build_header(specs, self.metadata)


class ShardLayout(Protocol):
    """A shard as the index sees it: its file name and its tensors (the plan's ``Shard``)."""

    filename: str

    @property
    def specs(self) -> list[TensorSpec]: ...


def write_index(tmp: Path, shards: Sequence[ShardLayout], prefix: str = "model") -> None:
    """The ``model.safetensors.index.json`` transformers expects when there is more than one shard."""
    if len(shards) < 2:
        return
    weight_map = {spec.name: shard.filename for shard in shards for spec in shard.specs}
    index = {
        "metadata": {
            "total_size": sum(spec.nbytes for shard in shards for spec in shard.specs),
            "total_parameters": sum(spec.numel for shard in shards for spec in shard.specs),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(tmp / f"{prefix}.safetensors.index.json", index)
