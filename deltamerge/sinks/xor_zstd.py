"""make-delta's sink for compressed XOR deltas (``formats/xor_zstd.py``): each block of rows is
split into the streams of the layout (byte planes, the top one masked) and each stream
zstd-compressed as it comes, so no tensor is ever whole.

A safetensors header comes first but gives every blob's size, which is known only once the
shard is compressed; so a shard's frames are appended to a scratch file beside it as they come,
and ``close`` writes the header and copies the frames after it (the compressed bytes only, read
back once), hashing the file as it writes it: make-delta's journal and manifest need its digest
and its header's (``files``), which the engine computes only for files of the rows' own bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.safetensors import build_header
from ..formats.xor_zstd import INDEX_KEY, MASKED, Block, Entry, dump_index, encode, zstd
from ..integrity.digest import DEFAULT_ALGORITHM, TensorDigest, hash_tensor, new_hash, raw_bytes
from ..memory import drop_file_range
from ..sources.folders import Layout
from ..sources.safetensors import SafetensorsCheckpoint
from ..sources.xor_zstd import ZstdXorCheckpoint
from ..tensor_spec import TensorSpec
from . import Buffer, Mismatch, ShardLayout, ShardWriter, Sink, Written

COPY_BYTES = 8 << 20


class CompressingWriter(ShardWriter):
    """One shard: frames to ``<shard>.frames`` as blocks come, the file itself at ``close``."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str], level: int,
                 layout: str, done: Callable[[str, tuple[str, int, str]], None]):
        self.path = path
        self.layout = layout
        self.specs = specs
        self.metadata = metadata
        self.done = done
        self.scratch = path.with_name(path.name + ".frames")
        self.fd = os.open(self.scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.position = 0
        self.blocks: dict[str, list[Block]] = {s.name: [] for s in specs}
        self.offsets: dict[str, int] = {}
        self.cctx = zstd().ZstdCompressor(level=level, write_checksum=True)

    def write_block(
        self, spec: TensorSpec, r0: int, r1: int, rows: torch.Tensor, buffer: Buffer
    ) -> list[Written]:
        """The rows' streams, each one zstd frame appended to the scratch file."""
        start = self.offsets.setdefault(spec.name, self.position)
        sizes = []
        for stream in encode(rows, buffer(rows.nbytes), self.layout):
            frame = self.cctx.compress(raw_bytes(stream))
            self._append(frame)
            sizes.append(len(frame))
        self.blocks[spec.name].append(Block(r0, r1, self.position - sum(sizes) - start, tuple(sizes)))
        return []

    def _append(self, data: bytes) -> None:
        _write_all(self.fd, data)
        self.position += len(data)

    def close(self) -> None:
        """Write the shard file: header (with the index), then the frames; durable, hashed."""
        entries = [Entry(s, tuple(self.blocks[s.name]), self.layout) for s in self.specs]
        for entry in entries:
            if (entry.blocks[-1].r1 if entry.blocks else -1) != entry.spec.rows:
                raise FormatError(
                    f"{self.path}: internal error: tensor {entry.spec.name!r} not wholly written")
        blobs = [TensorSpec(e.spec.name, torch.uint8, (sum(sum(b.sizes) for b in e.blocks),))
                 for e in entries]
        header = build_header(blobs, {**self.metadata, INDEX_KEY: dump_index(entries)})
        hasher = new_hash(DEFAULT_ALGORITHM, header)
        header_digest = hasher.copy().hexdigest()
        out = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(out, header)
            at = 0
            while at < self.position:
                chunk = os.pread(self.fd, min(COPY_BYTES, self.position - at), at)
                if not chunk:
                    raise FormatError(f"{self.scratch}: internal error: truncated")
                hasher.update(chunk)
                _write_all(out, chunk)
                at += len(chunk)
            os.fsync(out)
            drop_file_range(out, 0, len(header) + self.position)
        finally:
            os.close(out)
        os.close(self.fd)
        self.scratch.unlink()
        self.size = len(header) + self.position
        self.done(self.path.name, (hasher.hexdigest(), len(header), header_digest))

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ZstdXorSink(Sink):
    """Compressed XOR shards, ``metadata`` (the marks) in each header, frames at ``level``.

    ``files`` gets each finished shard's digest, header length and header digest. ``layout``
    is the one written; apply reads every layout the format defines."""

    layout = MASKED

    def __init__(self, metadata: dict[str, str], level: int):
        self.metadata = metadata
        self.level = level
        self.files: dict[str, tuple[str, int, str]] = {}
        zstd()  # the missing extra is named before any work

    def open_shard(self, folder: Path, shard: ShardLayout) -> CompressingWriter:
        return CompressingWriter(folder / shard.filename, shard.specs, self.metadata, self.level,
                                 self.layout, self.files.__setitem__)

    def finish(self, folder: Path) -> None:
        """Nothing: each shard file was finished when its last tensor was written."""

    def abort(self) -> None:
        """Nothing: the engine aborts the one shard open; its scratch file stays in the
        partial folder, which a resume clears."""

    def resume(self, folder: Path, kept: Mapping[str, Mapping[str, TensorDigest]]) -> None:
        """Nothing: each kept shard is a finished file of its own."""

    def recheck(
        self, folder: Path, shard: ShardLayout, size: int, digests: Mapping[str, TensorDigest],
        written: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        """The shard decompressed through the reader apply uses, each tensor hashed against the
        journal."""
        path = folder / shard.filename
        if not path.is_file() or path.is_symlink() or path.stat().st_size != size:
            raise Mismatch("the file is missing or its size differs from the journal's")
        try:
            ckpt = ZstdXorCheckpoint(SafetensorsCheckpoint(Layout(folder, "safetensors", (path,), None)))
        except FormatError as exc:
            raise Mismatch(str(exc).removeprefix(f"{path}: ")) from None
        try:
            result = {}
            for spec in shard.specs:
                if spec.name not in digests:
                    raise Mismatch("the journal does not list its tensors")
                result[spec.name] = hash_tensor(ckpt, spec, block_bytes, progress=advance,
                                                algorithm=digests[spec.name].algorithm)
                if result[spec.name] != digests[spec.name]:
                    raise Mismatch(f"tensor {spec.name!r} digest differs from the journal")
            return result
        except FormatError as exc:
            raise Mismatch(str(exc).removeprefix(f"{path}: ")) from None
        finally:
            ckpt.close()
