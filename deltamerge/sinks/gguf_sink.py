"""``--format gguf``: the engine's rows written into the GGUF file set ``plan_gguf`` lays out.

The plan's shards stay what the Hugging Face result's files would be (so the converter's tensor
order, which follows those files, is known), but no safetensors file is written: every shard
writes its tensors, converted by :class:`~.gguf.GGUFStreamWriter`, at their planned offsets in the
GGUF files, which are made (header, then their full size) when the first shard opens. A shard is
durable when the GGUF files are fsynced after its last tensor; that is what the journal records.

What is hashed is each GGUF tensor's bytes as they land in the file (``WrittenBlock.data``), in
the file's order: a regrouped qkv's bytes written ahead of it are read back from the file once
the bytes before them are written. Name, ggml type and shape are the GGUF file's, so the digests
describe the file, not the Hugging Face tensors it was made from (those the engine hashes too,
for the publisher's digests).
A tensor stacked from several (Mixtral's experts) is hashed slot by slot, ``NAME[E]`` of one
slot's shape: each slot is one Hugging Face tensor's rows, journaled with that tensor's shard, so
no digest spans the shards a layer's experts may be cut into.
A resume reads each kept tensor back from its offset, with the padding after it, and checks each
kept file's header and size; a file whose check fails is made again, and the shards with a
tensor in it are redone.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..compute_pool import ComputePool
from ..errors import DeltaMergeError
from ..integrity.digest import TensorDigest, new_hash
from ..memory import RangeWriteBehind, drop_file_range
from ..outputs.gguf import GgufFormat
from ..tensor_spec import TensorSpec
from . import Buffer, Mismatch, ShardLayout, ShardWriter, Sink, Written
from .aux import copy_aux, fix_config
from .folder import remove_entry
from .gguf import GGUFPlan, GGUFStreamWriter, GGUFTensor, as_is, plan_gguf, require_gguf

try:
    import gguf
except ImportError:
    gguf = None


def plan_gguf_output(
    aux: Mapping[str, Path | bytes], shards: Sequence[ShardLayout], *, vocab_rows: int | None,
    dtype: str | None, outtype: str | None, dir_name: str, split_max_size: int, where: Path,
    config_updates: dict | None = None,
) -> GGUFPlan:
    """The GGUF file set for the result: its non-weight files as the ``hf`` format would write
    them (config.json made to describe the result) are put in a scratch folder for
    :func:`~.gguf.plan_gguf` to read, since the result folder will hold only the GGUF files.
    Messages name ``where`` (the folder the config came from) instead of the scratch folder."""
    require_gguf()
    with tempfile.TemporaryDirectory(prefix="deltamerge-gguf-") as scratch:
        folder = Path(scratch)
        copy_aux(folder, dict(aux))
        fix_config(folder, vocab_rows, dtype, config_updates)
        specs = [spec for shard in shards for spec in shard.specs]
        try:
            return plan_gguf(
                folder, specs, outtype=outtype, dir_name=dir_name, split_max_size=split_max_size,
                hf_files=[[spec.name for spec in shard.specs] for shard in shards],
            )
        except DeltaMergeError as exc:
            raise type(exc)(str(exc).replace(str(folder), str(where))) from None


def sink_for(
    fmt: GgufFormat, shards: Sequence[ShardLayout], aux: Mapping[str, Path | bytes], *,
    vocab_rows: int | None, dtype: str | None, out: Path, folder: Path, where: Path,
    config_updates: dict | None = None, pool: ComputePool | None = None,
) -> GGUFSink:
    """``--format gguf``'s sink (``outputs/gguf.py``), its files planned whole before any work;
    ``out``'s name names the model when nothing else does."""
    plan = plan_gguf_output(aux, shards, vocab_rows=vocab_rows, dtype=dtype, outtype=fmt.outtype,
                            dir_name=out.name, split_max_size=fmt.shard_bytes, where=where,
                            config_updates=config_updates)
    return GGUFSink(plan, shards, pool=pool or ComputePool(fmt.threads))


def type_name(tensor: GGUFTensor) -> str:
    """The ggml type as GGUF readers name it: F32, F16, BF16, Q8_0."""
    return gguf.GGMLQuantizationType(tensor.qtype).name


class GGUFSink(Sink):
    converts = True
    unit = "tensor group"

    def __init__(self, plan: GGUFPlan, shards: Sequence[ShardLayout], *, pool: ComputePool | None = None):
        self.plan = plan
        self.pool = pool
        self._names = {s.filename: [spec.name for spec in s.specs] for s in shards}
        self._writer: GGUFStreamWriter | None = None
        self._behind: list[RangeWriteBehind] = []
        self._done: set[str] = set()
        self._checked: dict[int, str | None] = {}  # file index -> why it cannot be kept
        self._lock = threading.Lock()

    def row_multiple(self, name: str) -> int:
        tensor = self.plan.tensor(name)
        return tensor.head_rows if tensor is not None else 1

    def outputs(self) -> list[str]:
        return [f.name for f in self.plan.files]

    def record(self) -> dict:
        """The planned header's architecture and file type (``Q4_K_M``, llama.cpp's name, as in the
        file name); the outtype resolved (the result's dtype when none was asked for). A header
        without a file type (GPT-NeoX's converter writes none) has the converted outtype's, whose
        name is the outtype's (``F16``); llama-quantize always writes one."""
        kv = self.plan.kv
        ftype = kv.get(gguf.Keys.General.FILE_TYPE)
        file_type = (self.plan.outtype.upper() if ftype is None
                     else gguf.LlamaFileType(ftype).name.partition("_")[2])
        return {"gguf": {"architecture": kv[gguf.Keys.General.ARCHITECTURE],
                         "outtype": self.plan.outtype, "file_type": file_type,
                         "files": self.outputs()}}

    def aux_files(self, source: Mapping[str, Path | bytes]) -> dict[str, Path | bytes]:
        """None: a GGUF file holds the config and the tokenizer in its metadata."""
        return {}

    def planned_bytes(self, shards: Sequence[ShardLayout], skip: set[str]) -> int:
        if not skip:
            return sum(f.size for f in self.plan.files)
        return sum(self._tensor_bytes(s.filename) for s in shards if s.filename not in skip)

    def _tensor_bytes(self, shard: str) -> int:
        return sum(t.nbytes for t in map(self.plan.tensor, self._names[shard]) if t is not None)

    def _stream(self, folder: Path) -> GGUFStreamWriter:
        if self._writer is None:
            self._writer = GGUFStreamWriter(self.plan, folder, done=self._done, pool=self.pool)
            self._behind = [RangeWriteBehind(self._writer.fd(i)) for i in range(len(self.plan.files))]
        return self._writer

    def open_shard(self, folder: Path, shard: ShardLayout) -> ShardWriter:
        return _GGUFShard(self, self._stream(folder), folder, shard)

    def finish(self, folder: Path) -> None:
        """Every tensor written (or kept by the re-check): the files are complete and synced."""
        self._stream(folder).close()
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    # -- resume ----------------------------------------------------------------------------
    def recheck(
        self, folder: Path, shard: ShardLayout, size: int, digests: Mapping[str, TensorDigest],
        written: Mapping[str, TensorDigest], block_bytes: int, advance: Callable[[int], None],
    ) -> dict[str, TensorDigest]:
        tensors = [t for t in map(self.plan.tensor, self._names[shard.filename]) if t is not None]
        names = {t.digest_name for t in tensors}
        if set(digests) != set(self._names[shard.filename]) or set(written) != names:
            raise Mismatch("the journal does not list its tensors")
        if size != self._tensor_bytes(shard.filename):
            raise Mismatch(f"size {size} differs from the plan's")
        found = {}
        for tensor in tensors:
            why = self._check_file(folder, tensor.file)
            if why is not None:
                raise Mismatch(why)
            digest = self._hash_tensor(
                folder, tensor, block_bytes, advance, written[tensor.digest_name].algorithm
            )
            if digest != written[tensor.digest_name]:
                raise Mismatch(f"tensor {tensor.digest_name!r} digest differs from the journal")
            found[tensor.digest_name] = digest
        return found

    def _check_file(self, folder: Path, index: int) -> str | None:
        """Whether a GGUF file can be kept: a regular file of the planned size and header."""
        with self._lock:
            if index not in self._checked:
                self._checked[index] = _file_problem(folder, self.plan, index)
            return self._checked[index]

    def _hash_tensor(
        self, folder: Path, tensor: GGUFTensor, block_bytes: int, advance: Callable[[int], None],
        algorithm: str,
    ) -> TensorDigest:
        """The tensor's bytes at its offset (a stacked tensor's: the slot's), hashed in the
        journal's algorithm; the padding after the GGUF tensor must be zeros."""
        path = folder / self.plan.files[tensor.file].name
        whole = tensor.nbytes * max(tensor.slots, 1)
        pad = -whole % gguf.GGUF_DEFAULT_ALIGNMENT if tensor.last_slot else 0
        name = tensor.digest_name
        h = new_hash(algorithm)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            position, end = tensor.offset, tensor.offset + tensor.nbytes
            while position < end:
                chunk = os.pread(fd, min(block_bytes, end - position), position)
                if not chunk:
                    raise Mismatch(f"{path.name} ends inside tensor {name!r}")
                h.update(chunk)
                position += len(chunk)
                advance(len(chunk))
            if pad and os.pread(fd, pad, end) != bytes(pad):
                raise Mismatch(f"the padding after tensor {name!r} is not zeros")
            drop_file_range(fd, tensor.offset, tensor.nbytes + pad)
        except OSError as exc:
            raise Mismatch(f"cannot read {path.name}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        return TensorDigest(type_name(tensor), tensor.shape, h.hexdigest(), algorithm)

    def resume(self, folder: Path, kept: Mapping[str, Mapping[str, TensorDigest]]) -> None:
        """Continue the kept shards' files; a file none of them is in is made again."""
        self._done = {name for shard in kept for name in self._names[shard]}
        keep = {t.file for t in map(self.plan.tensor, self._done) if t is not None}
        for i, f in enumerate(self.plan.files):
            if i not in keep:
                remove_entry(folder / f.name)


def _file_problem(folder: Path, plan: GGUFPlan, index: int) -> str | None:
    f = plan.files[index]
    path = folder / f.name
    try:
        info = path.lstat()
    except FileNotFoundError:
        return f"{f.name} is missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{f.name} is not a regular file (a symlink?)"
    if info.st_size != f.size:
        return f"{f.name} is {info.st_size} bytes, the plan's is {f.size}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            header = os.pread(fd, len(f.header), 0)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"cannot read {f.name}: {exc.strerror or exc}"
    return None if header == f.header else f"{f.name}: its header differs from the plan's"


class _GGUFShard(ShardWriter):
    """One shard of the plan, written into the shared GGUF files."""

    def __init__(self, sink: GGUFSink, stream: GGUFStreamWriter, folder: Path, shard: ShardLayout):
        self.sink, self.stream, self.shard = sink, stream, shard
        self.path = folder / sink.plan.files[0].name

    def write_block(
        self, spec: TensorSpec, r0: int, r1: int, rows: torch.Tensor, buffer: Buffer
    ) -> list[Written]:
        """The blocks written, in byte order, for the hashing. Bytes written ahead of it (a
        regrouped qkv's) are queued for writeback but kept in the page cache, where the hashing
        reads them back, dropping them, once the bytes before them are written."""
        blocks = self.stream.write_rows(spec.name, r0, r1, rows, buffer)
        tensor = self.sink.plan.tensor(spec.name)
        if tensor is None:  # dropped
            return []
        pieces = []
        for block in blocks:
            if not block.reread:
                self.sink._behind[block.file].written(block.offset, block.nbytes, kept=block.ahead)
            if not block.ahead:
                pieces.append(Written(tensor.digest_name, type_name(tensor), tensor.shape, tensor.nbytes,
                                      block.offset - tensor.offset, block.data, as_is(tensor)))
        return pieces

    def close(self) -> None:
        """The shard's tensors are durable once the files are synced (and their pages dropped)."""
        for i, f in enumerate(self.sink.plan.files):
            fd = self.stream.fd(i)
            os.fsync(fd)
            drop_file_range(fd, 0, f.size)
        self.size = self.sink._tensor_bytes(self.shard.filename)

    def abort(self) -> None:
        """Nothing of its own to close: the sink's files are closed by ``Sink.abort``."""
