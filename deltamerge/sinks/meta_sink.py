"""``--format meta``: the engine's rows written into Meta's ``consolidated.NN.pth`` shards.

Every Hugging Face tensor is split across all ``--mp`` shard files (or copied into each), so the
files serve every shard of the plan: :class:`~.meta_pth.MetaWriter` makes them when the first
shard opens and each block goes to its place in every file. A shard of the plan is durable when
the files are fsynced after its last tensor; the archives are finished (data descriptors, the
central directory) once every tensor is in.

What is hashed is each Meta tensor of each file as ``torch.load`` gives it, named
``consolidated.00.pth:layers.0.attention.wq.weight``: its storage's bytes as they are written.
A resume reads each kept storage back from its planned place, which gives both its digest (against
the journal) and the CRC-32 the archive's records need, so a kept tensor is never written again
and nothing in the finished archive was taken on trust: every header and record around the
storages is written again.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS, itemsize
from ..errors import InputError
from ..integrity.digest import TensorDigest, new_hash
from ..memory import drop_file_range
from ..outputs.meta import MetaFormat
from ..tensor_spec import TensorSpec
from . import Buffer, Mismatch, ShardLayout, ShardWriter, Sink, Written
from .aux import fixed_config, load_config
from .folder import remove_entry
from .meta_pth import MetaLayout, MetaWriter
from .torch_zip import ArchiveLayout, archive_name_for
from .torch_zip_sums import CrcRanges

Kept = dict[tuple[int, str], tuple[int, bytes]]  # (shard file, Meta name) -> (CRC-32, first bytes)


def sink_for(
    fmt: MetaFormat, shards: Sequence[ShardLayout], aux: Mapping[str, Path | bytes], *,
    vocab_rows: int | None, dtype: str | None, out: Path, folder: Path, where: Path,
    config_updates: dict | None = None, pool: object = None,
) -> MetaSink:
    """``--format meta``'s sink (``outputs/meta.py``): the layout made from the config.json the
    ``hf`` result would have (``params.json`` is made from it), in ``fmt.mp`` shards."""
    config = load_config(aux.get("config.json"))
    if config is None:
        raise InputError(f"{where}: no config.json the result can be described by; Meta's layout "
                         "needs it (its params.json is made from it)")
    layout = MetaLayout(fixed_config(config, vocab_rows, dtype, config_updates),
                        [spec for shard in shards for spec in shard.specs], fmt.mp,
                        where=where / "config.json")
    return MetaSink(layout, shards, folder)


class MetaSink(Sink):
    converts = True
    unit = "tensor group"
    checksums = True  # the archives' CRC-32s: off the writing thread, which the 7B run waits on

    def __init__(self, layout: MetaLayout, shards: Sequence[ShardLayout], folder: Path):
        """``folder``: where the files are written (torch names an archive after its path)."""
        self.layout = layout
        self._names = {s.filename: [spec.name for spec in s.specs] for s in shards}
        self._writer: MetaWriter | None = None
        self._archives = [ArchiveLayout(tensors, archive_name_for(folder / filename))
                          for filename, tensors in zip(layout.filenames, layout.shards)]
        self._written = {
            (k, t.name): (f"{filename}:{t.name}", TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape),
                          math.prod(t.shape) * itemsize(t.dtype))
            for k, (filename, tensors) in enumerate(zip(layout.filenames, layout.shards))
            for t in tensors
        }
        self._places = {name: key for key, (name, *_) in self._written.items()}
        self._read_back: dict[str, Kept] = {}  # plan shard -> what its re-check read
        self._kept: Kept = {}
        self._lock = threading.Lock()

    def row_multiple(self, name: str) -> int:
        """Whole heads of q and k, whose rows are reordered within each head."""
        p = self.layout.placements.get(name)
        return p.head_dim if p is not None and p.head_dim else 1

    def outputs(self) -> list[str]:
        return list(self.layout.filenames)

    def aux_files(self, source: Mapping[str, Path | bytes]) -> dict[str, Path | bytes]:
        return self.layout.aux_files(source)

    def planned_bytes(self, shards: Sequence[ShardLayout], skip: set[str]) -> int:
        if not skip:
            return sum(archive.size for archive in self._archives)
        return sum(self._tensor_bytes(s.filename) for s in shards if s.filename not in skip)

    def _tensor_bytes(self, shard: str) -> int:
        return sum(nbytes for _, _, nbytes in self._storages(shard))

    def _storages(self, shard: str) -> list[tuple[int, str, int]]:
        """(shard file, Meta name, bytes) of every storage the plan shard's tensors fill."""
        found = []
        for name in self._names[shard]:
            p = self.layout.placements.get(name)
            if p is not None:
                found += [(k, p.meta, self._written[(k, p.meta)][3]) for k in range(self.layout.mp)]
        return found

    def _meta_writer(self, folder: Path) -> MetaWriter:
        if self._writer is None:
            kept = [{meta: v for (k, meta), v in self._kept.items() if k == i} for i in range(self.layout.mp)]
            self._writer = MetaWriter(folder, self.layout, kept=kept)
        return self._writer

    def open_shard(self, folder: Path, shard: ShardLayout) -> ShardWriter:
        return _MetaShard(self, self._meta_writer(folder), folder, shard)

    def checksum(self, pieces: Sequence[Written]) -> None:
        assert self._writer is not None, "checksum before any shard was opened"
        for piece in pieces:
            k, meta = self._places[piece.name]
            self._writer.checksum(k, meta, piece.offset, list(piece.data))

    def finish(self, folder: Path) -> None:
        """Every tensor written (or kept): the archives get their descriptors and directory."""
        self._meta_writer(folder).close(sync=True)
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def written(self, k: int, meta: str) -> tuple[str, str, tuple[int, ...], int]:
        """(name, dtype, shape, bytes) of a Meta tensor of shard file ``k``, as the digests name it."""
        return self._written[(k, meta)]

    # -- resume ----------------------------------------------------------------------------
    def recheck(
        self, folder: Path, shard: ShardLayout, size: int, digests: Mapping[str, TensorDigest],
        written: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        storages = self._storages(shard.filename)
        names = {self.written(k, meta)[0] for k, meta, _ in storages}
        if set(digests) != set(self._names[shard.filename]) or set(written) != names:
            raise Mismatch("the journal does not list its tensors")
        if size != self._tensor_bytes(shard.filename):
            raise Mismatch(f"size {size} differs from the plan's")
        found: dict[str, TensorDigest] = {}
        read_back: Kept = {}
        for k, meta, _ in storages:
            name, dtype, shape, _ = self.written(k, meta)
            record = self._archives[k].storages[meta]
            algorithm = written[name].algorithm  # every name: checked above
            digest, crc, head = _read_storage(folder / self.layout.filenames[k], record.data,
                                              record.size, block_bytes, advance, algorithm)
            found[name] = TensorDigest(dtype, shape, digest, algorithm)
            if found[name] != written[name]:
                raise Mismatch(f"tensor {name!r} digest differs from the journal")
            read_back[(k, meta)] = (crc, head)
        with self._lock:
            self._read_back[shard.filename] = read_back
        return found

    def resume(self, folder: Path, kept: Mapping[str, Mapping[str, TensorDigest]]) -> None:
        """The kept shards' storages are adopted by the archives; a file with none is made again."""
        self._kept = {key: v for shard in kept for key, v in self._read_back[shard].items()}
        files = {k for k, _ in self._kept}
        for k, filename in enumerate(self.layout.filenames):
            if k not in files:
                remove_entry(folder / filename)


def _read_storage(
    path: Path, start: int, size: int, block_bytes: int, advance: Callable[[int], None],
    algorithm: str,
) -> tuple[str, int, bytes]:
    """The digest (in ``algorithm``), CRC-32 and first bytes of ``size`` bytes of a file from ``start``."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise Mismatch(f"{path.name} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise Mismatch(f"{path.name} is not a regular file (a symlink?)")
    h, crc, head = new_hash(algorithm), 0, b""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Mismatch(f"cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        position, end = start, start + size
        while position < end:
            chunk = os.pread(fd, min(max(block_bytes, 1), end - position), position)
            if not chunk:
                raise Mismatch(f"{path.name} ends inside a tensor it should hold")
            h.update(chunk)
            crc = zlib.crc32(chunk, crc)
            if len(head) < CrcRanges.HEAD:
                head += chunk[: CrcRanges.HEAD - len(head)]
            position += len(chunk)
            advance(len(chunk))
        drop_file_range(fd, start, size)
    except OSError as exc:
        raise Mismatch(f"cannot read {path.name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return h.hexdigest(), crc, head


class _MetaShard(ShardWriter):
    """One shard of the plan, written into every ``consolidated.NN.pth``."""

    def __init__(self, sink: MetaSink, writer: MetaWriter, folder: Path, shard: ShardLayout):
        self.sink, self.writer, self.shard = sink, writer, shard
        self.path = folder / sink.layout.filenames[0]

    def write_block(
        self, spec: TensorSpec, r0: int, r1: int, rows: torch.Tensor, buffer: Buffer
    ) -> list[Written]:
        """The rows go straight from their buffer to their places (nothing is converted)."""
        p = self.sink.layout.placements.get(spec.name)
        whole = p is not None and (p.split is None or (self.sink.layout.mp == 1 and p.head_dim is None))
        pieces = []
        for k, meta, offset, buffers in self.writer.write_rows(spec.name, r0, r1, rows, checksum=False):
            name, dtype, shape, nbytes = self.sink.written(k, meta)
            pieces.append(Written(name, dtype, shape, nbytes, offset, buffers, whole))
        return pieces

    def close(self) -> None:
        """The shard's tensors are durable once every file is synced."""
        for zip_writer in self.writer.writers:
            os.fsync(zip_writer.fd)
        self.size = self.sink._tensor_bytes(self.shard.filename)

    def abort(self) -> None:
        """Nothing of its own to close: the sink's files are closed by ``Sink.abort``."""
