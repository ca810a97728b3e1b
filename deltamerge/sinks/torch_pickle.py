"""``data.pkl`` of ``torch.save({name: tensor})``, made from names, dtypes and shapes alone.

torch pickles a tensor as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)`` and its storage as the persistent id ``("storage",
torch.<Type>Storage, key, "cpu", numel)``, whose bytes the archive holds as ``data/<key>``.
Stand-ins that reduce to the same objects, through the same pickler, give the same bytes
before any tensor data exists.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import UnsupportedError, WorkError

# torch.storage._dtype_to_storage_type_map(): the legacy storage classes torch.save pickles.
STORAGE_TYPES = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}


class TensorLike(Protocol):
    """What the writers need of a tensor; ``TensorSpec`` and :class:`PthTensor` both are."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class PthTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class _Storage:
    """A tensor's storage in the pickle: the pickler turns it into its persistent id."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.numel = key, numel
        self.storage_type = getattr(torch, STORAGE_TYPES[dtype])


class _Tensor:
    """Reduces as ``torch.Tensor.__reduce_ex__`` does for a fresh contiguous CPU tensor."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple:
        # New tuples, as torch's size() and stride() are: a tuple shared by two tensors would be
        # pickled once and referred to. Strides treat dims of size 0 as 1, as torch's do.
        size = tuple(int(d) for d in self.shape)
        stride = tuple(math.prod(max(d, 1) for d in size[i + 1 :]) for i in range(len(size)))
        args = (self.storage, 0, size, stride, False, OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    # one object each, as torch's literals are, so the pickle memoizes them as torch's does
    _KIND, _LOCATION = "storage", "cpu"

    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            return (self._KIND, obj.storage_type, obj.key, self._LOCATION, obj.numel)
        return None


def state_dict_pickle(tensors: Sequence[TensorLike]) -> bytes:
    """The pickle of ``{name: tensor}`` in the order given; the i-th tensor's storage is ``str(i)``."""
    objects: dict[str, _Tensor] = {}
    for index, spec in enumerate(tensors):
        if spec.dtype not in STORAGE_TYPES:
            raise UnsupportedError(f"tensor {spec.name!r}: {spec.dtype} cannot be written to a .pth")
        if spec.name in objects:
            raise WorkError(f"internal error: tensor {spec.name!r} listed twice")
        objects[spec.name] = _Tensor(_Storage(str(index), spec.dtype, math.prod(spec.shape)), spec.shape)
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(objects)
    return out.getvalue()
