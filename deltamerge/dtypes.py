"""Dtype names as safetensors spells them, and the torch dtypes they stand for."""

from __future__ import annotations

import torch

from .errors import InputError
from .names import DTYPE_SPELLINGS

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# The integer type of the same width, used to XOR a tensor's bits.
BITS_DTYPE: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

USER_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, dtype) for name, dtype in DTYPE_SPELLINGS.items()
}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element (``dtype.itemsize``: no tensor made, so no allocator call under the GIL)."""
    return dtype.itemsize


def parse_user_dtype(name: str | torch.dtype | None, argument: str = "dtype") -> torch.dtype | None:
    """Accept the spellings users type on the command line (``float16``, ``bf16``...), or one of
    those torch dtypes: a result in any other dtype (int8, float64) is not a model the config
    could describe. ``argument`` is the option or parameter the message names."""
    if name is None:
        return None
    if not isinstance(name, (str, torch.dtype)):
        raise InputError(f"{argument} must be a dtype name or a torch.dtype, not {type(name).__name__}")
    if isinstance(name, torch.dtype):
        if name not in USER_DTYPES.values():
            raise InputError(f"{argument}={name}: use float16, bfloat16 or float32")
        return name
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        raise InputError(
            f"unknown {argument} {name!r}: use float16, bfloat16 or float32"
        ) from None


def short_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
