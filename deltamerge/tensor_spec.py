"""What a tensor is (name, dtype, shape), independent of the format or file that stores it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dtypes import itemsize


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, independent of where it is stored."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def rows(self) -> int:
        """Blocks are cut along the first dimension; a 0-d tensor is one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1
