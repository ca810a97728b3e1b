"""GGUF output, planned before any data and written block by block.

The bytes are those llama.cpp's ``convert_hf_to_gguf.py`` writes for the Hugging Face result,
with the converter class of its architecture (``gguf_arch``: LLaMA, Qwen, ...). :func:`plan_gguf`
settles the whole file set from what the merge plan knows before any data: the key/values
(``gguf_kv`` and the architecture's), the tensor table (GGUF names, ggml types, shapes, sizes
and offsets), the tensors the architecture generates (written with the headers) and so every
header's bytes.
:class:`GGUFStreamWriter` writes the headers, then each tensor's rows at the tensor's planned
offset, so the merge may stream tensors in its own order while the file keeps the converter's.

The converter's tensor order is the Hugging Face files' order (by file name), each file's
tensors sorted by name; its data conversions are per row: dtypes other than f16/f32 widen to f32,
the architecture's transforms apply (q and k rows permuted within each head as
``LlamaModel.permute`` does, +1 on Gemma's norms, fused qkv rows regrouped), then ``gguf.quants``
converts to the ggml type (f32 for norms and 1-D tensors whatever the outtype; f16 where a row
cannot be cut into q8_0 blocks of 32). So a block of whole rows converts alone, a q/k block of
whole heads too, and rows that end mid-head wait (at most one head) for the next block. A fused
qkv regrouped across the tensor converts row by row as any tensor does, and its rows are written
in runs (a head's q, k or v) to their places, which the tensor's later blocks fill in between.

The quantized outtypes (``gguf_types.OUTTYPES``: q4_k_m, q5_0...) are what llama.cpp's
``llama-quantize`` (no importance matrix) writes from the converter's file at the result's own
dtype: the converter's key/values with ``general.quantization_version`` and ``general.file_type``
moved to the end, the tensors in llama-quantize's order with the types of its mix, and each row
quantized (``gguf_quants``) from the converter's value of it, widened to f32. Rows quantize
alone, so blocks of them are cut into pieces quantized on the run's compute pool
(``compute_pool``), and the bytes do not depend on its threads.
"""

from __future__ import annotations

import bisect
import functools
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ..compute_pool import ComputePool
from ..errors import FormatError, InputError, UnsupportedError, WorkError
from ..formats.files import json_parsed_once
from ..outputs.gguf import OUTTYPES
from . import FileBytes, gguf_arch, gguf_checks, gguf_kv, gguf_pack, gguf_types, run_bytes
from .gguf_kv import require_gguf
from .gguf_quants import quantize_rows

try:
    import gguf
    import numpy as np
    from gguf.gguf_writer import WriterState
except ImportError:
    gguf = None

__all__ = ["GGUFFile", "GGUFPlan", "GGUFStreamWriter", "GGUFTensor", "GeneratedTensor", "OUTTYPES",
           "WrittenBlock", "plan_gguf", "require_gguf"]

# Rows convert this many elements at a time, so that gguf.quants' temporaries stay small.
_CHUNK_ELEMENTS = 1 << 18
# ...and quantize this many at a time, a piece for each thread: gguf_quants' best chunk.
_QUANT_CHUNK_ELEMENTS = 1 << 17
Buffer = Callable[[int], torch.Tensor]  # n -> an n-byte uint8 tensor
_IOV_MAX = 1024
# Tensors the converter drops: transformers' buffers, not weights.
_DROPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# Matrices the converter keeps in F32 whatever the outtype (of its list, those the
# architectures here have).
_F32_SUFFIXES = ("_norm.weight", ".ffn_gate_inp.weight")
_CONVERTED_AS_IS = (torch.float16, torch.float32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TensorLike(Protocol):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file set, and where its bytes go."""

    hf_name: str
    hf_dtype: torch.dtype  # what its rows come as
    name: str  # the GGUF name, e.g. blk.0.attn_q.weight
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major like torch; GGUF's tensor info lists it reversed
    nbytes: int
    file: int  # index into GGUFPlan.files
    offset: int  # of its first byte, in its file
    permute_heads: int  # LlamaModel.permute with this many heads; 0: rows kept as they are
    plus_one: bool = False  # 1 added to every element (Gemma's norms), in the converter's dtype
    hf_rows: int = 0  # the Hugging Face tensor's rows, when the GGUF tensor keeps only the first
    # Rows regrouped across the whole tensor (fused qkv of Falcon, BLOOM, GPT-NeoX): the source
    # row of each row of the GGUF tensor; its rows convert as they come, and go in runs to their places.
    row_order: tuple[int, ...] = field(default=(), repr=False)
    # llama-quantize's input type (the converter's), when it quantizes the tensor to ``qtype``
    quantized_from: int | None = None
    # Slot ``slot`` of a tensor stacked from ``slots`` Hugging Face tensors (Mixtral's experts);
    # ``shape``, ``nbytes`` and ``offset`` are then the slot's. 0 slots: a tensor of its own.
    slot: int = 0
    slots: int = 0

    @property
    def digest_name(self) -> str:
        """What its digest is named: the GGUF name, with ``[slot]`` for a slot of a stacked tensor."""
        return f"{self.name}[{self.slot}]" if self.slots else self.name

    @property
    def last_slot(self) -> bool:
        """Whether the GGUF tensor ends with it (the file's padding follows)."""
        return self.slot == max(self.slots, 1) - 1

    @property
    def source_rows(self) -> int:
        return self.hf_rows or self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0]

    @property
    def head_rows(self) -> int:
        """Rows that convert together: one head for q/k, else one row; for a regrouped tensor, the
        rows its runs are made of (a head's q, k or v), so that a block's rows are whole runs."""
        if self.row_order:
            return run_unit(self.row_order)
        return self.shape[0] // self.permute_heads if self.permute_heads else 1


@dataclass(frozen=True)
class GeneratedTensor:
    """A tensor the architecture makes from the config (``rope_freqs``): its bytes are known
    when planning, and written with its file's header."""

    name: str
    data: bytes = field(repr=False)
    file: int
    offset: int


@dataclass(frozen=True)
class GGUFFile:
    name: str
    header: bytes = field(repr=False)  # magic to tensor infos, zero-padded to the data alignment
    size: int = 0


@dataclass(frozen=True)
class GGUFPlan:
    outtype: str
    files: tuple[GGUFFile, ...] = field(repr=False)
    tensors: tuple[GGUFTensor, ...] = field(repr=False)  # in file order
    dropped: tuple[str, ...]  # Hugging Face tensors the converter leaves out
    kv: dict[str, Any] = field(repr=False)  # the first file's key/values, in file order
    generated: tuple[GeneratedTensor, ...] = field(default=(), repr=False)
    _index: dict[str, GGUFTensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {t.hf_name: t for t in self.tensors})

    def tensor(self, hf_name: str) -> GGUFTensor | None:
        return self._index.get(hf_name)


@dataclass(frozen=True)
class WrittenBlock:
    """Bytes of a tensor at ``offset`` of its file, the buffers one after another.

    Just written, ``data`` may share memory with the rows given, so use it before they are reused.
    ``ahead``: just written past bytes of the tensor still to come (a regrouped tensor's), so
    given again as ``reread`` once those are: its bytes read back from the file (``FileBytes``),
    a chunk at a time as ``data`` is iterated. Leaving the ``ahead`` ones out, a tensor's blocks
    come in byte order, its first byte to its last, to be hashed as they come.
    """

    file: int
    offset: int
    data: Sequence[memoryview]
    ahead: bool = False
    reread: bool = False

    @property
    def nbytes(self) -> int:
        return run_bytes(self.data)


def _spec(t: TensorLike | tuple[str, torch.dtype, Sequence[int]]) -> tuple[str, torch.dtype, tuple[int, ...]]:
    if isinstance(t, tuple):
        name, dtype, shape = t
    else:
        name, dtype, shape = t.name, t.dtype, t.shape
    return name, dtype, tuple(int(d) for d in shape)


def _converter_order(names: list[str], hf_files: Sequence[Sequence[str]] | None, where: Path) -> list[str]:
    """The converter reads the weight files in file-name order, each one's tensors by name."""
    if hf_files is None:
        return sorted(names)
    order = [name for group in hf_files for name in sorted(group)]
    if sorted(order) != sorted(names):
        raise InputError(f"{where}: the Hugging Face files' tensors are not the plan's tensors")
    return order


def _outtype(outtype: str | None, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> str:
    """The result's dtype by default (the first tensor of two or more dimensions, as the converter looks)."""
    if outtype is not None:
        if outtype not in OUTTYPES:
            raise InputError(f"unknown GGUF outtype {outtype!r}: use {', '.join(OUTTYPES)}")
        return outtype
    first = next((dtype for _, dtype, shape in specs if len(shape) >= 2), None)
    return {torch.float32: "f32", torch.bfloat16: "bf16"}.get(first, "f16")


def _types(outtype: str) -> tuple[int, int]:
    """(general.file_type, ggml type of the weight matrices)."""
    ft, qt = gguf.LlamaFileType, gguf.GGMLQuantizationType
    return {
        "f32": (ft.ALL_F32, qt.F32),
        "f16": (ft.MOSTLY_F16, qt.F16),
        "bf16": (ft.MOSTLY_BF16, qt.BF16),
        "q8_0": (ft.MOSTLY_Q8_0, qt.Q8_0),
    }[outtype]


def _qtype(gguf_name: str, shape: tuple[int, ...], matrix_type: int) -> int:
    """The converter's choice in ``ModelBase.prepare_tensors``: F32 for 1-D tensors, norms and the
    routers of experts (``ffn_gate_inp``), the outtype's for the others."""
    qt = gguf.GGMLQuantizationType
    if (len(shape) <= 1 or gguf_name.endswith(_F32_SUFFIXES)
            or gguf_name[-7:] not in (".weight", ".lora_a", ".lora_b")):
        return qt.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qt(matrix_type)]
    if shape[-1] % block_size:
        return qt.F16  # its QuantError fallback
    return matrix_type


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return math.prod(shape) // block_size * type_size


def _quantized(
    converter: Any, planned: dict[str, list[dict[str, Any]]], outtype: str
) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """llama-quantize's file from the converter's (one file): its writer and its tensors, with
    their new types and sizes and ``quantized_from`` (the converter's type) where it quantizes.

    llama-quantize copies the key/values, then sets ``general.quantization_version`` and
    ``general.file_type``, which removes each and appends it; it lists every tensor (those the
    architecture generates too) in its own order, with as many dimensions as ``ggml_n_dims``
    counts. Generated tensors are 1-D, which it never quantizes: they keep their F32 bytes.
    """
    kv = converter.kv_data[0]
    arch = kv[gguf.Keys.General.ARCHITECTURE].value

    def value(key: str, default: int = 0) -> int:
        v = kv.get(key.format(arch=arch))
        v = default if v is None else v.value
        return v[0] if isinstance(v, list) else v

    n_head = value(gguf.Keys.Attention.HEAD_COUNT)
    model = gguf_types.ModelInfo(arch, value(gguf.Keys.LLM.BLOCK_COUNT), n_head,
                                 value(gguf.Keys.Attention.HEAD_COUNT_KV, n_head),
                                 value(gguf.Keys.LLM.EXPERT_COUNT))
    infos = converter.tensors[0]
    types = gguf_types.quantized_types(outtype, model, [(name, info.shape) for name, info in infos.items()])
    writer = gguf.GGUFWriter(None, arch)
    moved = (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE)
    writer.kv_data[0] = {key: v for key, v in kv.items() if key not in moved}
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf_types.file_type(outtype))
    out = {}
    for name in gguf_types.order(list(infos)):
        info = infos[name]
        qtype, nbytes, shape = int(info.dtype), info.nbytes, tuple(info.shape)
        if name in planned:
            new = types.get(name, qtype)
            out[name] = [dict(slot) for slot in planned[name]]
            if new != qtype:
                nbytes = _nbytes(shape, new)
                for slot in out[name]:
                    slot.update(qtype=new, nbytes=_nbytes(slot["shape"], new), quantized_from=qtype)
            qtype = new
        dims = shape[len(shape) - gguf_types.n_dims(shape):]
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    return writer, out


def _stackable(members: list[str], by_name: dict[str, tuple[torch.dtype, tuple[int, ...]]],
               where: Path) -> tuple[int, ...]:
    """The shape of each of the tensors the converter stacks, which must be one dtype and shape."""
    dtype, shape = by_name[members[0]]
    for member in members[1:]:
        if by_name[member] != (dtype, shape):
            other, other_shape = by_name[member]
            raise FormatError(f"{where}: tensor {member} is {other} {list(other_shape)}, but {members[0]}, "
                              f"stacked with it, is {dtype} {list(shape)}")
    return shape


def _permute_heads(hf_name: str, shape: tuple[int, ...], n: int, where: Path) -> int:
    """The architecture's head count for the tensor, checked against its rows."""
    if not n:
        return 0
    if shape[0] % n or (shape[0] // n) % 2:
        raise FormatError(f"{where}: tensor {hf_name} of {shape[0]} rows does not split into {n} heads "
                          "of an even size")
    return n


def _render_headers(writer: Any) -> list[bytes]:
    """Each file's header as the writer writes it, padded to the alignment, into memory.

    ``GGUFWriter`` writes headers only to files it opens itself; given in-memory files (its
    ``fout``, which it allows to be set before the header is written), it writes the same bytes.
    Its key/values are packed by ``gguf_pack`` (the same bytes, arrays packed whole).
    """
    buffers = [io.BytesIO() for _ in writer.tensors]
    writer.fout = buffers
    writer.state = WriterState.EMPTY
    writer.write_header_to_file()
    for buf, kv_data in zip(buffers, writer.kv_data):
        buf.write(gguf_pack.kv_bytes(writer, kv_data))
    writer.state = WriterState.KV_DATA
    writer.write_ti_data_to_file()
    for buf in buffers:
        writer.write_padding(buf, buf.tell())
    writer.fout = None
    return [buf.getvalue() for buf in buffers]


@json_parsed_once()
def plan_gguf(
    folder: Path,
    tensors: Iterable[TensorLike | tuple[str, torch.dtype, Sequence[int]]],
    *,
    outtype: str | None = None,
    hf_files: Sequence[Sequence[str]] | None = None,
    dir_name: str | None = None,
    filename: str | None = None,
    split_max_size: int = 0,
    split_max_tensors: int = 0,
) -> GGUFPlan:
    """The GGUF file set ``convert_hf_to_gguf.py --outtype OUTTYPE`` would write for the result
    (for the quantized outtypes, the file ``llama-quantize`` makes of the converter's).

    ``folder`` holds the result's non-weight files (config.json, the tokenizer's files,
    generation_config.json, a README.md model card); ``tensors`` are the Hugging Face result's
    (name, dtype, shape); ``hf_files`` the names in each of its weight files, in file-name order
    (None: one file). ``dir_name`` is the result folder's name, which names the model when the
    config and card do not (default: ``folder``'s). ``filename`` defaults to the converter's
    (``Name-Size-F16.gguf``); splits are named ``stem-00001-of-00003.gguf`` as llama.cpp's are.
    """
    require_gguf()
    folder = Path(folder)
    config = gguf_kv.read_config(folder)
    where = folder / "config.json"
    arch = gguf_arch.for_config(config, where)
    gguf_checks.check_side_files(folder, config)
    h = gguf_kv.hparams(config, folder)
    arch.check(config, h, where)
    specs = [_spec(t) for t in tensors]
    by_name = {name: (dtype, shape) for name, dtype, shape in specs}
    outtype = _outtype(outtype, specs)
    converted = _outtype(None, specs) if outtype in gguf_types.OUTTYPES else outtype
    if converted != outtype and (split_max_size or split_max_tensors):
        raise InputError(f"{folder}: --outtype {outtype} writes one file, as llama-quantize does: "
                         "leave out --max-shard-size")
    ftype, matrix_type = _types(converted)

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.model_arch],
                             split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    name_map = gguf.get_tensor_name_map(arch.model_arch, gguf_kv.block_count(h, where))
    generated = {}
    for gguf_name, data in arch.generated(writer, h, where):
        raw = data.contiguous().numpy()
        writer.add_tensor_info(gguf_name, raw.shape, raw.dtype, raw.nbytes)
        generated[gguf_name] = raw.tobytes()
    dropped: list[str] = []
    planned: dict[str, list[dict[str, Any]]] = {}  # GGUF name -> GGUFTensor's fields (per slot) but the place

    def add(hf_name: str, gguf_name: str | None, shape: tuple[int, ...], slots: list[dict[str, Any]]) -> None:
        if gguf_name is None:
            raise UnsupportedError(f"{folder}: tensor {hf_name} has no GGUF name in llama.cpp's "
                                   f"{gguf.MODEL_ARCH_NAMES[arch.model_arch]} map")
        qtype = _qtype(gguf_name, shape, matrix_type)
        nbytes = _nbytes(shape, qtype)
        try:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        except ValueError as e:
            raise FormatError(f"{folder}: tensor {hf_name}: {e}") from None
        planned[gguf_name] = [dict(slot, name=gguf_name, qtype=qtype, nbytes=nbytes // len(slots))
                              for slot in slots]

    stacks: dict[tuple[str, ...], dict[tuple[int, int], str]] = {}  # a layer's slots filled so far
    for hf_name in _converter_order(list(by_name), hf_files, folder):
        dtype, shape = by_name[hf_name]
        if hf_name.endswith(_DROPPED_SUFFIXES) or arch.dropped(hf_name, h):
            dropped.append(hf_name)
            continue
        if dtype not in _FLOAT_DTYPES or not shape:
            raise UnsupportedError(f"{folder}: tensor {hf_name} is {dtype} {list(shape)}; GGUF output takes "
                                   "floating-point tensors")
        stacked = arch.stacked(hf_name, h, where)
        if stacked is not None:
            layer = stacks.setdefault(stacked.names, {})
            layer[stacked.index, stacked.slot] = hf_name
            if len(layer) == len(stacked.names) * stacked.slots:  # as the converter, at its last
                del stacks[stacked.names]
                for i, name in enumerate(stacked.names):
                    members = [layer[i, slot] for slot in range(stacked.slots)]
                    add(members[-1], name_map.get_name(key=name, try_suffixes=(".weight", ".bias")),
                        (stacked.slots, *_stackable(members, by_name, folder)),
                        [dict(hf_name=member, hf_dtype=dtype, shape=by_name[member][1], permute_heads=0,
                              slot=slot, slots=stacked.slots) for slot, member in enumerate(members)])
            continue
        gguf_name = name_map.get_name(key=arch.map_name(hf_name), try_suffixes=(".weight", ".bias"))
        hf_rows, shape = shape[0], (arch.kept_rows(hf_name, shape, h, folder), *shape[1:])
        hf_rows = 0 if hf_rows == shape[0] else hf_rows
        add(hf_name, gguf_name, shape, [dict(
            hf_name=hf_name, hf_dtype=dtype, shape=shape,
            permute_heads=_permute_heads(hf_name, shape, arch.permute_heads(hf_name, h), folder),
            plus_one=arch.plus_one(hf_name, h), hf_rows=hf_rows,
            row_order=_row_order(arch, hf_name, shape, h, folder))])
    for layer in stacks.values():
        some = next(iter(layer.values()))
        raise FormatError(f"{folder}: tensor {some} is stacked with others the model lacks "
                          f"({len(layer)} of a layer's experts found): llama.cpp's converter fails on it")

    with gguf_checks.reading(folder):
        meta = gguf_kv.add_general(writer, folder, config, dir_name or folder.name)
        arch.add_parameters(writer, h, ftype, where)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.add_vocab(writer, folder, h)
    if converted != outtype:
        writer, planned = _quantized(writer, planned, outtype)
        ftype = gguf_types.file_type(outtype)
    if filename is None:
        total = writer.get_total_parameter_count()[0]
        filename = gguf.naming_convention(
            meta.name, meta.basename, meta.finetune, meta.version, meta.size_label,
            gguf.LlamaFileType(ftype).name.partition("_")[2], model_type="LoRA" if total < 0 else None,
        ) + ".gguf"
    names = [p.name for p in writer.format_shard_names(Path(filename))]
    headers = _render_headers(writer)
    files, table, extra = [], [], []
    for i, (name, header, infos) in enumerate(zip(names, headers, writer.tensors)):
        offset = len(header)
        for gguf_name, info in infos.items():
            if gguf_name in generated:
                extra.append(GeneratedTensor(gguf_name, generated[gguf_name], i, offset))
            else:
                position = offset
                for slot in planned[gguf_name]:
                    table.append(GGUFTensor(**slot, file=i, offset=position))
                    position += slot["nbytes"]
            offset += gguf.GGUFWriter.ggml_pad(info.nbytes, writer.data_alignment)
        files.append(GGUFFile(name, header, offset))
    kv = {key: value.value for key, value in writer.kv_data[0].items()}
    return GGUFPlan(outtype, tuple(files), tuple(table), tuple(dropped), kv, tuple(extra))


@dataclass
class _Progress:
    next_row: int = 0
    pending: torch.Tensor | None = None  # rows not yet converted: they end mid-head
    pending_start: int = 0
    given: int = 0  # the tensor's bytes given back in byte order so far
    ahead: list[tuple[int, int]] = field(default_factory=list)  # (start, stop) written past ``given``


class GGUFStreamWriter:
    """Writes a :class:`GGUFPlan` into ``folder``: every header first, then rows as they come.

    Each tensor's rows must come in order, from row 0 to its last, as blocks of whole rows
    (dim 0 of the Hugging Face tensor); tensors may come in any order, even interleaved. Blocks
    of q/k that end mid-head are held until the head is complete (at most ``head_rows - 1``
    rows), so blocks that are multiples of ``GGUFTensor.head_rows`` never wait. The dropped
    tensors (``plan.dropped``) are accepted and ignored. A regrouped tensor's block is written in
    runs to their places: those past bytes still to come are written at once and given back
    (:class:`WrittenBlock`) read from the file once the bytes before them are written, so what
    ``write_rows`` gives back comes in byte order and memory holds a block, never the tensor.

    Files are created at their final size, so padding needs no writes. ``done`` resumes: the
    tensors named are taken as written already, and the files that hold one must exist with the
    planned header and size; a file that holds none of them is made again. ``pool`` (the run's,
    else one of ``threads`` of the writer's own) quantizes the pieces of a block (quantized
    outtypes), with the same bytes whatever its threads.
    """

    def __init__(self, plan: GGUFPlan, folder: Path, *, done: Iterable[str] | None = None,
                 threads: int = 1, pool: ComputePool | None = None):
        require_gguf()
        self.plan = plan
        self.folder = Path(folder)
        self._dropped = set(plan.dropped)
        self._progress = {t.hf_name: _Progress() for t in plan.tensors}
        self._fds: list[int] = []
        self._own_pool = pool is None
        self._pool = pool if pool is not None else ComputePool(threads)
        kept = [t for t in map(plan.tensor, done or ()) if t is not None]
        try:
            for i, f in enumerate(plan.files):
                self._fds.append(self._open(f, resume=any(t.file == i for t in kept)))
        except BaseException:
            self.abort()
            raise
        for tensor in kept:
            self._progress[tensor.hf_name].next_row = tensor.source_rows

    def _open(self, f: GGUFFile, resume: bool) -> int:
        path = self.folder / f.name
        if not resume:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                _pwrite_all(fd, (memoryview(f.header),), 0, path)
                os.ftruncate(fd, f.size)
                for t in self.plan.generated:
                    if self.plan.files[t.file] is f:
                        _pwrite_all(fd, (memoryview(t.data),), t.offset, path)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise WorkError(f"{path}: missing, cannot resume the GGUF output") from None
        if os.fstat(fd).st_size != f.size or os.pread(fd, len(f.header), 0) != f.header:
            os.close(fd)
            raise WorkError(f"{path}: not the planned GGUF file, cannot resume into it")
        return fd

    def fd(self, file: int) -> int:
        """The open descriptor of ``plan.files[file]``, to push written ranges out of the page cache."""
        return self._fds[file]

    def write_rows(
        self, hf_name: str, r0: int, r1: int, rows: torch.Tensor, out: Buffer | None = None
    ) -> tuple[WrittenBlock, ...]:
        """Convert rows ``r0:r1`` of a Hugging Face tensor and write them; the blocks written
        (none when rows are held or dropped), and those written earlier now in byte order.

        ``out(n)`` gives the n-byte uint8 buffer converted bytes go into (one the caller reuses,
        so that no block allocates); by default each block gets a new one. Rows kept in their
        own type and order are written from their own memory.
        """
        tensor = self.plan.tensor(hf_name)
        if tensor is None:
            if hf_name in self._dropped:
                return ()
            raise ValueError(f"tensor {hf_name} is not in the GGUF plan")
        p = self._progress[hf_name]
        if r0 != p.next_row or not r0 < r1 <= tensor.source_rows:
            raise ValueError(f"tensor {hf_name}: rows {r0}:{r1} given, rows from {p.next_row} expected")
        if tuple(rows.shape) != (r1 - r0, *tensor.shape[1:]) or rows.dtype != tensor.hf_dtype:
            raise ValueError(f"tensor {hf_name}: rows {r0}:{r1} given as {rows.dtype} {list(rows.shape)}")
        p.next_row = r1
        n_rows = tensor.shape[0]
        if r0 >= n_rows:  # rows the converter cuts off (Gemma 3's out-of-vocabulary embeddings)
            return ()
        if r1 > n_rows:
            rows, r1 = rows[: n_rows - r0], n_rows
        start = r0
        if p.pending is not None:
            rows, start = torch.cat([p.pending, rows]), p.pending_start
        unit = tensor.head_rows
        end = r1 if r1 == n_rows else r1 - r1 % unit
        p.pending = rows[end - start:].clone() if end < r1 else None
        p.pending_start = end
        if end == start:
            return ()
        data = _encode(tensor, rows[: end - start], out, self._pool)
        fd, path = self._fds[tensor.file], self.folder / self.plan.files[tensor.file].name
        blocks: list[WrittenBlock] = []
        for at, views in _places(tensor, start, end, data):
            _pwrite_all(fd, views, tensor.offset + at, path)
            n = sum(len(v) for v in views)
            if at > p.given:
                blocks.append(WrittenBlock(tensor.file, tensor.offset + at, views, ahead=True))
                _land(p.ahead, at, at + n)
                continue
            blocks.append(WrittenBlock(tensor.file, tensor.offset + at, views))
            p.given = at + n
            while p.ahead and p.ahead[0][0] == p.given:  # written earlier: now in byte order
                a, p.given = p.ahead.pop(0)
                blocks.append(WrittenBlock(tensor.file, tensor.offset + a,
                                           FileBytes(fd, tensor.offset + a, p.given - a), reread=True))
        return tuple(blocks)

    def missing(self) -> list[str]:
        """The tensors not wholly written yet."""
        return [t.hf_name for t in self.plan.tensors if self._progress[t.hf_name].next_row < t.source_rows]

    def close(self, fsync: bool = True) -> None:
        """Check that every tensor was written, flush the files to disk and close them."""
        if missing := self.missing():
            t = self.plan.tensor(missing[0])
            assert t is not None
            self.abort()
            raise WorkError(f"{self.folder / self.plan.files[t.file].name}: tensor {t.hf_name} was not "
                            f"wholly written ({len(missing)} tensors missing)")
        try:
            if fsync:
                for fd in self._fds:
                    os.fsync(fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the files as they are (a resumable partial output)."""
        while self._fds:
            os.close(self._fds.pop())
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: each head's two rotary halves interleaved, row by row."""
    return (rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
            .swapaxes(1, 2)
            .reshape(rows.shape))


def kept_type(tensor: GGUFTensor) -> bool:
    """Whether the tensor stays in its Hugging Face type (f16 or f32): its rows' bytes are kept."""
    kept = {torch.float16: gguf.GGMLQuantizationType.F16, torch.float32: gguf.GGMLQuantizationType.F32}
    return kept.get(tensor.hf_dtype) == tensor.qtype and not tensor.plus_one


def as_is(tensor: GGUFTensor) -> bool:
    """Whether the tensor's GGUF bytes are its Hugging Face bytes (its type kept, no permutation)."""
    return kept_type(tensor) and not tensor.permute_heads and not tensor.row_order


def permuted_order(rows: int, head_rows: int) -> list[int]:
    """``permute``'s row order: row ``2i + j`` of each head is its row ``j * head_rows / 2 + i``."""
    half = head_rows // 2
    heads = range(rows // head_rows)
    return [h * head_rows + j * half + i for h in heads for i in range(half) for j in (0, 1)]


@functools.lru_cache(maxsize=16)
def row_runs(order: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``order`` as runs of consecutive source rows, ``(start, stop)``: a regrouped fused qkv
    moves whole heads, so its 12288 rows (GPT-NeoX at 7B widths) are 96 runs to write and
    hash, not 12288; a tensor's order is the same for every layer, hence the cache."""
    runs: list[tuple[int, int]] = []
    for r in order:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return tuple(runs)


@functools.lru_cache(maxsize=16)
def placements(order: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """``order``'s runs by source row: ``(start, stop, row)``, source rows ``start:stop`` going
    to rows from ``row`` of the regrouped tensor."""
    out, row = [], 0
    for a, b in row_runs(order):
        out.append((a, b, row))
        row += b - a
    return tuple(sorted(out))


def _land(ahead: list[tuple[int, int]], a: int, b: int) -> None:
    """Add bytes ``a:b`` to ``ahead`` (sorted, disjoint), joined to the ranges they meet, so that
    a region filled block by block is read back as one."""
    i = bisect.bisect(ahead, (a, b))
    if i and ahead[i - 1][1] == a:
        i, a = i - 1, ahead[i - 1][0]
        del ahead[i]
    if i < len(ahead) and ahead[i][0] == b:
        b = ahead.pop(i)[1]
    ahead.insert(i, (a, b))


def _row_order(arch: Any, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], folder: Path
               ) -> tuple[int, ...]:
    """The architecture's regrouping of a tensor's rows: a permutation of them, or refused (the
    converter's reshape fails where the config's heads do not tile the tensor); none where it
    moves nothing (Falcon's one kv group: its rows are already queries, key, value)."""
    order = arch.row_order(hf_name, shape, h, folder)
    if order and sorted(order) != list(range(shape[0])):
        raise UnsupportedError(f"{folder}: tensor {hf_name!r} {list(shape)}: the heads its config names "
                               "do not tile its rows; llama.cpp's converter fails on it")
    return () if order == tuple(range(shape[0])) else order


@functools.lru_cache(maxsize=16)
def run_unit(order: tuple[int, ...]) -> int:
    """The rows every run of ``order`` is a whole multiple of, so also every run's start (a
    head's q, k or v); 1 for an order that moves nothing."""
    inner = {bound for a, b, _ in placements(order) for bound in (a, b)} - {0, len(order)}
    return math.gcd(*inner) or 1


def _places(
    tensor: GGUFTensor, start: int, end: int, data: tuple[memoryview, ...]
) -> list[tuple[int, list[memoryview]]]:
    """Where the encoded rows ``start:end`` go: (byte offset in the tensor, the buffers there),
    by offset. Rows in order go at their own place; a regrouped tensor's (``data``, one buffer in
    source order) in runs to theirs, the runs that meet in the tensor as one place."""
    n = tensor.row_bytes
    if not tensor.row_order:
        return [(start * n, list(data))]
    [flat] = data
    runs = sorted(((row + lo - a) * n, flat[(lo - start) * n : (hi - start) * n])
                  for a, b, row in placements(tensor.row_order)
                  if (lo := max(a, start)) < (hi := min(b, end)))
    places: list[tuple[int, list[memoryview]]] = []
    meets = -1
    for at, view in runs:
        if at == meets:
            places[-1][1].append(view)
        else:
            places.append((at, [view]))
        meets = at + len(view)
    return places


def _encode(
    tensor: GGUFTensor, rows: torch.Tensor, out: Buffer | None, pool: ComputePool | None = None
) -> tuple[memoryview, ...]:
    """The converter's conversion of whole rows (of whole heads for q and k), into ``out``'s buffer.

    Rows kept in their type are written from their own memory (q and k gathered in ``permute``'s
    order, which moves whole rows); a regrouped tensor's stay in their order (``_places`` moves
    them). Conversions are per element, or per 32-element q8_0 block of
    a row, so rows convert a few at a time (``_CHUNK_ELEMENTS``): ``gguf.quants``' temporaries stay
    small whatever the block. Rows llama-quantize quantizes go a few at a time to ``pool``'s
    threads, each piece into its own part of the buffer.
    """
    if kept_type(tensor):
        flat = memoryview(rows.contiguous().numpy().reshape(-1).view(np.uint8))
        if not tensor.permute_heads:
            return (flat,)
        n = tensor.row_bytes
        order = tuple(permuted_order(rows.shape[0], tensor.head_rows))
        return tuple(flat[a * n : b * n] for a, b in row_runs(order))
    row_bytes = tensor.row_bytes
    buffer = out(rows.shape[0] * row_bytes) if out is not None else torch.empty(
        rows.shape[0] * row_bytes, dtype=torch.uint8)
    dest = buffer.numpy()
    unit = tensor.head_rows
    chunk = _CHUNK_ELEMENTS if tensor.quantized_from is None else _QUANT_CHUNK_ELEMENTS
    step = max(unit, chunk // max(1, rows[0].numel()) // unit * unit)

    def convert(a: int) -> None:
        b = min(rows.shape[0], a + step)
        dest[a * row_bytes : b * row_bytes] = _convert(tensor, rows[a:b])

    starts = range(0, rows.shape[0], step)
    if pool is None or tensor.quantized_from is None:
        for a in starts:
            convert(a)
    else:
        pool.map(convert, starts)
    return (memoryview(dest),)


def _convert(tensor: GGUFTensor, rows: torch.Tensor) -> np.ndarray:
    """widen what is not f16/f32 to f32, permute, ``gguf.quants``: the bytes, as uint8."""
    qtype = gguf.GGMLQuantizationType(tensor.qtype)
    if tensor.quantized_from is not None:
        return _quantize(tensor, rows)
    if rows.dtype == torch.bfloat16 and qtype == gguf.GGMLQuantizationType.BF16 and not tensor.plus_one:
        x = _bf16_as_gguf_quantizes_it(rows)
    else:
        x = rows if rows.dtype in _CONVERTED_AS_IS else rows.to(torch.float32)
        if tensor.plus_one:
            x = x + 1
    if tensor.permute_heads:
        x = permute(x, x.shape[0] // tensor.head_rows)
    if x.dtype == torch.int16:
        return x.contiguous().numpy().reshape(-1).view(np.uint8)
    with np.errstate(over="ignore"):  # beyond f16's range is inf, as the converter makes it
        data = gguf.quants.quantize(x.contiguous().numpy(), qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _quantize(tensor: GGUFTensor, rows: torch.Tensor) -> np.ndarray:
    """llama-quantize's bytes: the converter's value of the rows (``_convert`` to the converter's
    type, so every transform of the architecture applies) widened to f32, then quantized (or
    made f16, its fallback for widths its type cannot cut into blocks)."""
    qt = gguf.GGMLQuantizationType
    source = qt(tensor.quantized_from)
    converted = {qt.F32: torch.float32, qt.F16: torch.float16, qt.BF16: torch.bfloat16}[source]
    data = _convert(replace(tensor, qtype=source, quantized_from=None), rows)
    x = torch.from_numpy(data).view(converted).to(torch.float32).reshape(-1, tensor.shape[-1])
    qtype = qt(tensor.qtype)
    if qtype == qt.F16:
        return x.to(torch.float16).numpy().reshape(-1).view(np.uint8)
    return quantize_rows(x, qtype).numpy().reshape(-1)


def _bf16_as_gguf_quantizes_it(rows: torch.Tensor) -> torch.Tensor:
    """bf16 widened to f32 and rounded back by ``gguf.quants``: the same bits, NaNs made quiet.

    Its rounding adds at most 0x8000 to the 16 zero bits widening appends, so nothing carries;
    only a NaN changes, gaining the quiet bit. Done on the bits, this skips two conversions.
    """
    bits = rows.view(torch.int16)
    nan = (bits & 0x7FFF) > 0x7F80
    return torch.where(nan, bits | 0x40, bits) if bool(nan.any()) else bits


def _pwrite_all(fd: int, data: Sequence[memoryview], offset: int, path: Path) -> None:
    """The buffers one after another from ``offset`` (gathered, ``_IOV_MAX`` at a time)."""
    pending = [d for d in data if len(d)]
    first = 0  # pending[first:] are still to write (an index: popping the front of 10k views is slow)
    try:
        while first < len(pending):
            n = os.pwritev(fd, pending[first : first + _IOV_MAX], offset)
            offset += n
            while first < len(pending) and n >= len(pending[first]):
                n -= len(pending[first])
                first += 1
            if n:
                pending[first] = pending[first][n:]
    except OSError as e:
        raise WorkError(f"{path}: could not write ({e.strerror})") from None
