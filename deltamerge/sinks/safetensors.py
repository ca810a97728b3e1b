"""Results as sharded safetensors: the sink the engine writes through, and the index after it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.safetensors import build_header
from ..integrity.digest import TensorDigest, hash_tensor, raw_bytes
from ..memory import WriteBehind, drop_file_range
from ..outputs.hf import HfFormat
from ..sources.folders import Layout
from ..sources.safetensors import SafetensorsCheckpoint
from ..tensor_spec import TensorSpec
from . import Buffer, Mismatch, ShardLayout, ShardWriter, Sink, Written
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

    def write_block(
        self, spec: TensorSpec, r0: int, r1: int, rows: torch.Tensor, buffer: Buffer
    ) -> list[Written]:
        """The rows' bytes, appended: the plan's order is the file's."""
        self.write(raw_bytes(rows))
        return []

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
            self.size = self.position
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

    def open_shard(self, folder: Path, shard: ShardLayout) -> StreamingWriter:
        return StreamingWriter(folder / shard.filename, shard.specs, self.metadata)

    def file_prefix(self, specs: list[TensorSpec]) -> bytes:
        return build_header(specs, self.metadata)

    def finish(self, folder: Path) -> None:
        """Nothing: each shard file was finished when its last tensor was written."""

    def abort(self) -> None:
        """Nothing: the engine aborts the one shard file open."""

    def resume(self, folder: Path, kept: Mapping[str, Mapping[str, TensorDigest]]) -> None:
        """Nothing: each kept shard is a finished file of its own."""

    def recheck(
        self, folder: Path, shard: ShardLayout, size: int, digests: Mapping[str, TensorDigest],
        written: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        """The shard file read back through the reader the merge uses: its header against the
        plan's shard and this run's metadata, each tensor hashed against the journal."""
        path = folder / shard.filename
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise Mismatch("the file is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise Mismatch("not a regular file (a symlink?)")
        if info.st_size != size:
            raise Mismatch(f"size {info.st_size} differs from the journal's {size}")
        try:
            ckpt = SafetensorsCheckpoint(Layout(path.parent, "safetensors", (path,), None))
        except FormatError as exc:
            raise Mismatch(str(exc).removeprefix(f"{path}: ")) from None
        try:
            return self._check_tensors(ckpt, path, shard, digests, block_bytes, advance)
        except FormatError as exc:
            raise Mismatch(str(exc).removeprefix(f"{path}: ")) from None
        except OSError as exc:
            raise Mismatch(f"cannot read it: {exc.strerror or exc}") from None
        finally:
            ckpt.close()

    def _check_tensors(
        self, ckpt: SafetensorsCheckpoint, path: Path, shard: ShardLayout,
        claimed: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        table = [(s.name, s.dtype, s.shape) for s in ckpt.specs.values()]
        if table != [(s.name, s.dtype, s.shape) for s in shard.specs]:
            raise Mismatch("its tensor table differs from the plan's shard")
        if ckpt.headers[path].metadata != self.metadata:
            raise Mismatch("its header metadata differs from what this run writes")
        if set(claimed) != {s.name for s in shard.specs}:
            raise Mismatch("the journal does not list its tensors")
        digests = {}
        for spec in shard.specs:
            digest = hash_tensor(ckpt, spec, block_bytes, progress=advance,
                                 algorithm=claimed[spec.name].algorithm)
            if digest != claimed[spec.name]:
                raise Mismatch(f"tensor {spec.name!r} digest differs from the journal")
            digests[spec.name] = digest
        return digests


def sink_for(fmt: HfFormat, shards: Sequence[ShardLayout], aux: Mapping[str, Path | bytes],
             **planned: object) -> SafetensorsSink:
    """``--format hf``'s sink (``outputs/hf.py``): each shard its own file, planned as it is written."""
    return SafetensorsSink()


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
