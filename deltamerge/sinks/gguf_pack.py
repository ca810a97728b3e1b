"""A GGUF header's key/values packed as ``GGUFWriter.write_kv_data_to_file`` packs them, arrays whole.

The writer packs an array one element at a time (a ``struct.pack`` and a buffer copy for each),
which takes seconds for a BPE vocabulary's token list, types and merges (151k of each for Qwen2).
These are the same bytes packed an array at a time: ``struct.pack`` of n values in the writer's
byte order is the n single packs joined (its standard sizes have no padding), and a string array
is each string's length and UTF-8 bytes, joined. Whatever else (a nested array, an array of mixed
types, a value that is no array) goes through the writer's own ``_pack_val``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from itertools import chain
from typing import Any

try:
    import gguf
    from gguf import GGUFValueType
except ImportError:
    gguf = None


def kv_bytes(writer: Any, kv_data: Mapping[str, Any]) -> bytes:
    """``kv_data`` (one file's ``writer.kv_data``: key -> ``GGUFValue``) as ``writer`` writes it."""
    out = bytearray()
    for key, value in kv_data.items():
        out += writer._pack_val(key, GGUFValueType.STRING, add_vtype=False)
        packed = None
        if value.type == GGUFValueType.ARRAY:
            packed = _array(writer, value.value, value.sub_type)
        if packed is None:
            packed = writer._pack_val(value.value, value.type, add_vtype=True, sub_type=value.sub_type)
        out += packed
    return bytes(out)


def _array(writer: Any, items: Any, sub_type: Any) -> bytes | None:
    """An array value's bytes (its type, then element type, count and elements); None where the
    writer's own packing is left to it."""
    if not isinstance(items, (list, tuple)) or not items:
        return None
    types = dict(zip(map(type, items), items))  # each type of element, with one of them
    if sub_type is None:
        try:
            kinds = {GGUFValueType.get_type(item) for item in types.values()}
        except ValueError:
            return None  # the writer refuses it, in its words
        if len(kinds) != 1:
            return None
        sub_type = kinds.pop()
    order = "<" if writer.endianess == gguf.GGUFEndian.LITTLE else ">"
    head = struct.pack(f"{order}IIQ", GGUFValueType.ARRAY, sub_type, len(items))
    fmt = writer._simple_value_packing.get(sub_type)
    if fmt is not None:
        order = "" if sub_type == GGUFValueType.BOOL else order  # as the writer packs a bool
        return head + struct.pack(f"{order}{len(items)}{fmt}", *items)
    if sub_type == GGUFValueType.STRING:
        if types.keys() == {str}:
            encoded = list(map(str.encode, items))  # UTF-8
        else:
            encoded = [item.encode("utf-8") if isinstance(item, str) else item for item in items]
        lengths = map(struct.Struct(f"{order}Q").pack, map(len, encoded))
        return head + b"".join(chain.from_iterable(zip(lengths, encoded)))
    return None
