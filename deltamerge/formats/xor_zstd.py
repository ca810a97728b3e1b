"""Compressed XOR deltas: each tensor's XOR bits split into byte planes, each plane zstd-framed.

A fine-tune moves weights by little, so the XOR of base and target is mostly zero in the high
bytes (sign and exponent) and noise-like in the low ones: byte planes compress where the
interleaved bytes do not. The file is a plain safetensors file: each delta tensor is stored as
a 1-D ``U8`` blob of frames (block by block, and within a block plane by plane, low byte
first), and the header's ``__metadata__`` holds, under :data:`INDEX_KEY`, a JSON index giving
each tensor's dtype and shape and, for each block of rows, its row range and the compressed
size of each plane. So every reader of headers (marks, hashing, the manifest's header digest)
works on it unchanged, and a block is read and decompressed alone: no tensor is ever whole.
"""

from __future__ import annotations

import json
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
    sizes: tuple[int, ...]  # one compressed frame per byte plane, low byte first


@dataclass(frozen=True)
class Entry:
    """One delta tensor as stored: its spec when decompressed, and its blocks."""

    spec: TensorSpec
    blocks: tuple[Block, ...]

    def to_json(self) -> dict:
        return {"dtype": TORCH_TO_SAFETENSORS[self.spec.dtype], "shape": list(self.spec.shape),
                "blocks": [[b.r0, b.r1, list(b.sizes)] for b in self.blocks]}


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
        blocks, offset, row = [], 0, 0
        for r0, r1, sizes in obj["blocks"]:  # type: ignore[index]
            sizes = tuple(int(s) for s in sizes)
            if r0 != row or r1 < r0 or len(sizes) != itemsize(dtype) or min(sizes) < 0:
                raise ValueError
            blocks.append(Block(r0, r1, offset, sizes))
            offset, row = offset + sum(sizes), r1
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{path}: tensor {name!r}: its entry in the {INDEX_KEY} index is damaged") from None
    if blob.dtype != torch.uint8 or blob.shape != (offset,) or row != spec.rows:
        raise FormatError(
            f"{path}: tensor {name!r}: the {INDEX_KEY} index does not tile its {blob.nbytes} "
            "compressed bytes and its rows"
        )
    return Entry(spec, tuple(blocks))


def split_planes(rows: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    """The byte planes of ``rows`` (plane ``i``: byte ``i`` of every element), laid into ``out``
    (a uint8 buffer of ``rows.nbytes``)."""
    width = rows.element_size()
    n = rows.numel()
    planes = out[: n * width].view(width, n)
    planes.copy_(rows.reshape(-1).view(torch.uint8).view(n, width).t())
    return list(planes)


def join_planes(planes: list[torch.Tensor], out: torch.Tensor) -> None:
    """The inverse of :func:`split_planes`: ``out`` (uint8, element bytes interleaved) from planes."""
    width = len(planes)
    view = out.view(-1, width)
    for i, plane in enumerate(planes):
        view[:, i].copy_(plane)
