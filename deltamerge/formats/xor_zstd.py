"""Compressed XOR deltas: each tensor's XOR bits split into byte planes, each plane zstd-framed.

A fine-tune moves weights by little, so the XOR of base and target is mostly zero in the high
bytes (sign and exponent) and noise-like in the low ones: byte planes compress where the
interleaved bytes do not. The file is a plain safetensors file: each delta tensor is stored as
a 1-D ``U8`` blob of frames (block by block, and within a block stream by stream), and the
header's ``__metadata__`` holds, under :data:`INDEX_KEY`, a JSON index giving each tensor's
dtype, shape and layout and, for each block of rows, its row range and the compressed size of
each stream. So every reader of headers (marks, hashing, the manifest's header digest) works on
it unchanged, and a block is read and decompressed alone: no tensor is ever whole.

Two layouts (the index's ``layout``; absent in files written before it existed):

- :data:`PLANES`: one stream per byte plane, low byte first;
- :data:`MASKED` (written now): the planes below the top one as above, then a bitmap of the
  elements whose top byte is non-zero (bit ``i % 8`` of byte ``i // 8``), then those top bytes
  alone. The top byte (the sign and the exponent's high bits) changes for a few percent of a
  fine-tune's elements; zstd codes such a sparse plane far above its entropy (its runs of zeros
  cost a match each), while the bitmap is dense and the non-zero bytes are few: on a real fp16
  fine-tune this takes the top plane from 0.21 to 0.15 bytes per element (docs/performance.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from ..dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from ..errors import FormatError, UnsupportedError
from ..tensor_spec import TensorSpec

KIND = "xor-zstd"
INDEX_KEY = "deltamerge.xor_zstd"
DEFAULT_LEVEL = 3
PLANES = "planes"
MASKED = "masked-top"
LAYOUTS = (PLANES, MASKED)


def zstd() -> ModuleType:
    """The ``zstandard`` package, imported only when a compressed delta is made or applied."""
    try:
        import zstandard
    except ImportError:
        raise UnsupportedError(
            "compressed XOR deltas need the zstandard package: pip install 'deltamerge[zstd]'"
        ) from None
    return zstandard


@dataclass(frozen=True)
class Block:
    """Rows ``[r0, r1)`` of a tensor: its frames start at ``offset`` in the tensor's blob."""

    r0: int
    r1: int
    offset: int
    sizes: tuple[int, ...]  # one compressed frame per stream of the layout, in its order


@dataclass(frozen=True)
class Entry:
    """One delta tensor as stored: its spec when decompressed, and its blocks."""

    spec: TensorSpec
    blocks: tuple[Block, ...]
    layout: str = MASKED

    def to_json(self) -> dict:
        """The layout is named unless it is :data:`PLANES`, so such entries read as they always did."""
        layout = {} if self.layout == PLANES else {"layout": self.layout}
        return {"dtype": TORCH_TO_SAFETENSORS[self.spec.dtype], "shape": list(self.spec.shape),
                **layout, "blocks": [[b.r0, b.r1, list(b.sizes)] for b in self.blocks]}


def stream_count(layout: str, width: int) -> int:
    """How many frames a block of ``width``-byte elements has in ``layout``."""
    return width if layout == PLANES else width + 1


def dump_index(entries: list[Entry]) -> str:
    return json.dumps({e.spec.name: e.to_json() for e in entries}, separators=(",", ":"))


def parse_index(path: Path, metadata: dict[str, str], blobs: dict[str, TensorSpec]) -> dict[str, Entry]:
    """The index of a file whose blobs are ``blobs``; anything that does not describe exactly
    those blobs (blocks tiling every row, frames tiling every byte) is refused, naming the tensor."""
    raw = metadata.get(INDEX_KEY)
    try:
        index = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        index = None
    if not isinstance(index, dict) or set(index) != set(blobs):
        raise FormatError(f"{path}: its {INDEX_KEY} index is missing or does not list its tensors")
    return {name: _entry(path, name, index[name], blobs[name]) for name in blobs}


def _entry(path: Path, name: str, obj: object, blob: TensorSpec) -> Entry:
    try:
        dtype = SAFETENSORS_TO_TORCH[obj["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in obj["shape"])  # type: ignore[index]
        spec = TensorSpec(name, dtype, shape)
        layout = obj.get("layout", PLANES)  # type: ignore[union-attr]
        if layout not in LAYOUTS:
            raise ValueError
        streams = stream_count(layout, itemsize(dtype))
        blocks, offset, row = [], 0, 0
        for r0, r1, sizes in obj["blocks"]:  # type: ignore[index]
            sizes = tuple(int(s) for s in sizes)
            if r0 != row or r1 < r0 or len(sizes) != streams or min(sizes) < 0:
                raise ValueError
            blocks.append(Block(r0, r1, offset, sizes))
            offset, row = offset + sum(sizes), r1
    except (AttributeError, KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: tensor {name!r}: its entry in the {INDEX_KEY} index is damaged") from None
    if blob.dtype != torch.uint8 or blob.shape != (offset,) or row != spec.rows:
        raise FormatError(
            f"{path}: tensor {name!r}: the {INDEX_KEY} index does not tile its {blob.nbytes} "
            "compressed bytes and its rows"
        )
    return Entry(spec, tuple(blocks), layout)


def split_planes(rows: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    """The byte planes of ``rows`` (plane ``i``: byte ``i`` of every element), laid into ``out``
    (a uint8 buffer of ``rows.nbytes``)."""
    width = rows.element_size()
    n = rows.numel()
    planes = out[: n * width].view(width, n)
    planes.copy_(rows.reshape(-1).view(torch.uint8).view(n, width).t())
    return list(planes)


def encode(rows: torch.Tensor, out: torch.Tensor, layout: str) -> list[torch.Tensor]:
    """The streams of ``rows`` in ``layout``, each to be compressed as one frame; ``out`` is a
    uint8 buffer of ``rows.nbytes`` (the planes)."""
    planes = split_planes(rows, out)
    if layout == PLANES:
        return planes
    top = planes[-1]
    mask = top.bool()
    return [*planes[:-1], pack_bits(mask), top[mask]]


def decode(layout: str, width: int, n: int, inflate: Callable[[int], torch.Tensor],
           out: torch.Tensor) -> None:
    """``out`` (uint8, ``n`` elements of ``width`` bytes interleaved) from a block's streams;
    ``inflate(nbytes)`` decompresses the next frame, refusing it unless it holds ``nbytes``."""
    planes = [inflate(n) for _ in range(width - 1)]
    if layout == PLANES:
        planes.append(inflate(n))
    else:
        mask = unpack_bits(inflate((n + 7) // 8), n)
        top = torch.zeros(n, dtype=torch.uint8)
        top.masked_scatter_(mask, inflate(int(torch.count_nonzero(mask))))
        planes.append(top)
    join_planes(planes, out)


_BYTE_BITS = (  # byte b -> the int64 whose byte i is bit i of b
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).view(-1))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool) as bits, element ``i`` at bit ``i % 8`` of byte ``i // 8``, zero-padded.

    Eight 0/1 bytes read as one little-endian int64 are gathered into its top byte by one
    multiplication (each byte's bit lands on its own bit of the top byte, nothing carries)."""
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n].copy_(mask.view(torch.uint8))
    words = padded.view(torch.int64)
    return ((words * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` bools (a table lookup per byte; ``index_select``
    takes a third of the time indexing takes)."""
    return _BYTE_BITS.index_select(0, bits.int()).view(torch.uint8).view(torch.bool)[:n]


def join_planes(planes: list[torch.Tensor], out: torch.Tensor) -> None:
    """The inverse of :func:`split_planes`: ``out`` (uint8, element bytes interleaved) from planes."""
    width = len(planes)
    view = out.view(-1, width)
    for i, plane in enumerate(planes):
        view[:, i].copy_(plane)
