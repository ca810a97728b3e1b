"""The safetensors file format: a validating header parser, and the header a writer emits.

The safetensors library neither streams writes nor reads without mapping the whole file, so
deltamerge speaks the format itself. Parsing is strict because headers come from strangers: every
check the library makes (and a few it does not) fails with a :class:`FormatError` naming the file,
before any offset from the header is used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from ..errors import FormatError
from ..tensor_spec import TensorSpec
from .files import describe_download, open_for_reading, reject_duplicates, text_ok

MAX_HEADER_BYTES = 100_000_000
# A zero-size tensor's dimensions are not bounded by its bytes; beyond this (or the file's size)
# they are nonsense, and would make the engine loop over billions of empty row blocks.
MAX_EMPTY_DIM = 2**31
# Sizes, strides and offsets are signed 64-bit in torch and in the format.
MAX_BYTES = 2**63 - 1


@dataclass(frozen=True)
class StoredTensor:
    spec: TensorSpec
    offset: int  # absolute offset of the first byte in the file


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]
    data_start: int


def describe_non_safetensors(path: Path, head: bytes) -> str | None:
    """Name the usual reasons a weight file is not a safetensors file, from its first bytes."""
    known = describe_download(path, head)
    if known:
        return known
    if head.startswith(b"PK\x03\x04"):
        return f"{path}: a zip archive (a PyTorch .bin?), not a safetensors file"
    return None


def read_header(path: Path, fd: int | None = None) -> Header:
    """Parse and validate the header of ``path`` (through ``fd`` when the caller holds it open)."""
    own = fd is None
    if own:
        fd = open_for_reading(path)
    try:
        size = os.fstat(fd).st_size
        n = header_length(path, os.pread(fd, 64, 0), size)
        raw = os.pread(fd, n, 8)
        if len(raw) != n:
            raise FormatError(f"{path}: truncated while reading its header")
        return parse_header(path, raw, size)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        if own:
            os.close(fd)


def header_length(path: Path, head: bytes, size: int) -> int:
    """The header's length from the file's first 64 bytes (``head``), checked against the limit
    and the file's ``size`` before a byte of the header is read (here or over HTTP)."""
    known = describe_non_safetensors(path, head)
    if known:
        raise FormatError(known)
    if size == 0:
        raise FormatError(f"{path}: empty file (an interrupted download?)")
    if len(head) < 8:
        raise FormatError(f"{path}: truncated: {size} bytes is shorter than a safetensors header")
    n = struct.unpack("<Q", head[:8])[0]
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: header length {n} exceeds the 100 MB limit: not a valid safetensors file"
        )
    if 8 + n > size:
        raise FormatError(f"{path}: truncated: header claims {n} bytes but the file has {size}")
    return n


def parse_header(path: Path, raw: bytes, size: int) -> Header:
    """Validate the header ``raw`` of a file of ``size`` bytes: every entry, and that the
    tensors tile the data exactly. Local files and remote (Hub) headers alike come through here."""
    data_start = 8 + len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: the safetensors header does not parse: {reason}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) and text_ok(k) and text_ok(v) for k, v in metadata.items()
    ):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, StoredTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in obj.items():
        spec, begin, end = _parse_entry(path, name, info, size)
        tensors[name] = StoredTensor(spec, data_start + begin)
        spans.append((begin, end, name))
    _check_spans(path, sorted(spans), size - data_start, data_start)
    return Header(path, tensors, dict(metadata), data_start)


def _check_spans(path: Path, spans: list[tuple[int, int, str]], data: int, start: int) -> None:
    """Tensors must tile the data buffer exactly: no hole, no overlap, nothing past the end.

    A contiguous layout that needs more bytes than the file has is a truncated download; a
    range past the end among holes is a corrupt header, and is named as such.
    """
    cursor = 0
    gap = None
    for begin, end, name in spans:
        if begin != cursor and gap is None:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a hole before it"
            gap = f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {what}"
        cursor = max(cursor, end)
    if gap is not None:
        for begin, end, name in spans:
            if end > data:
                raise FormatError(
                    f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] run past the end of "
                    f"the data ({data} bytes): a corrupt header"
                )
        raise FormatError(gap)
    if cursor > data:
        raise FormatError(
            f"{path}: truncated: tensors need {start + cursor} bytes, the file has {start + data}"
        )
    if cursor < data:
        raise FormatError(
            f"{path}: {data - cursor} bytes after the last tensor: not a valid safetensors file"
        )


def check_shape(where: str, shape: tuple[int, ...] | list[int], dtype: torch.dtype, size: int) -> None:
    """Refuse a shape no file of ``size`` bytes can hold, before anything is sized from it.

    A zero-size tensor's other dimensions are not bounded by its bytes: each is bounded here by
    the file's size (or ``MAX_EMPTY_DIM``), and the product of all of them (zeros counted as
    one, as strides are) times the item size must fit in 64 bits. Readers of every format call
    this, so a shape one of them accepts is one every writer and reader here handles.
    """
    _check_dims(where, shape, size)
    _check_strides(where, shape, dtype)


def _check_dims(where: str, shape: tuple[int, ...] | list[int], size: int) -> None:
    if any(d > max(size, MAX_EMPTY_DIM) for d in shape):
        raise FormatError(f"{where}: shape {list(shape)} has a dimension no file of this size can hold")


def _check_strides(where: str, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> None:
    if math.prod(max(d, 1) for d in shape) * itemsize(dtype) > MAX_BYTES:
        raise FormatError(f"{where}: shape {list(shape)} is too large: its strides overflow 64 bits")


def _parse_entry(
    path: Path, name: str, info: object, size: int
) -> tuple[TensorSpec, int, int]:
    where = f"{path}: tensor {name!r}"
    if not text_ok(name):
        raise FormatError(f"{where}: the name is not valid UTF-8")
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry is not an object")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_TO_TORCH:
        raise FormatError(f"{where}: unknown dtype {dtype_name!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    _check_dims(where, shape, size)
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] are negative or reversed")
    dtype = SAFETENSORS_TO_TORCH[dtype_name]
    nbytes = math.prod(shape) * itemsize(dtype)
    if nbytes != end - begin:
        raise FormatError(
            f"{where}: shape {shape} of {dtype_name} needs {nbytes} bytes, data_offsets give {end - begin}"
        )
    _check_strides(where, shape, dtype)  # a zero-size tensor's bytes bound none of its dimensions
    return TensorSpec(name, dtype, tuple(shape)), begin, end


def aligned_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Largest item size first (stable), so that every tensor starts aligned to its item size."""
    return sorted(specs, key=lambda s: -itemsize(s.dtype))


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The header bytes for ``specs`` laid out in the given order, padded to a multiple of 8."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        obj[spec.name] = {
            "dtype": TORCH_TO_SAFETENSORS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
