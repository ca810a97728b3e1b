"""What peft's multiplicative adapters (OFT, BOFT, HRA) share: the weight times a square matrix.

Their merges multiply the weight by an ``in x in`` fp32 matrix ``M`` built from the adapter's
small tensors: OFT and BOFT on a Linear layer compute ``torch.mm(M, fp32(W).t()).t()`` (``W @
M^T``), OFT on an embedding and HRA ``torch.mm(fp32(W), M)``, then round once to the weight's
dtype (BOFT scales the rows by ``boft_s`` first). Row ``i`` of the result needs row ``i`` of
``W`` and all of ``M``, so the rows stream: ``M`` is built once per tensor, whole, as peft
builds it (``in x in`` fp32: 64 MiB for a 4096-wide input, 485 MiB for 11008), and each block
of rows is multiplied by it. The bits are peft's because the product is the same MKL call
with the same operand layout on fewer columns: each output element's sum over ``in`` is the
same, except in MKL's kernels for products of fewer than 12 rows, which sum in another order
(measured with MKL 2024.2 on AVX2, inputs 64 to 11008 wide, against peft's whole product).
So a piece of fewer than ``MIN_ROWS`` rows is padded with zero rows up to that, and a tensor
of fewer rows than that is one block (``row_multiple``) multiplied whole, as peft multiplies it.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from . import Scratch
from .adapter import RowDelta

MIN_ROWS = 16  # rows every product has (padded), so MKL sums each element as for the whole


class RotationDelta(RowDelta):
    """Rows of ``cast(W @ M^T)`` (``transposed``: peft's Linear layout) or ``cast(W @ M)``."""

    def __init__(self, source, parts, rows: int, transposed: bool):
        super().__init__(source, parts)
        self.rows = rows
        self.transposed = transposed
        self.row_multiple = rows if 0 < rows < MIN_ROWS else 1

    @abstractmethod
    def matrix(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``M``, fp32, computed from the module's parameters as peft computes it."""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors["matrix"] = self.matrix(tensors)

    def scale_rows(self, prod: torch.Tensor, r0: int) -> None:  # noqa: B027 - optional hook
        """Change the fp32 product of rows ``r0..`` in place before it is rounded (BOFT)."""

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        m = self.tensors()["matrix"]
        n = acc.shape[0]
        x = acc
        if n < MIN_ROWS and self.rows >= MIN_ROWS:
            x = scratch.get("rotation-pad", torch.float32, (MIN_ROWS, acc.shape[1]))
            x[n:].zero_()
            x[:n].copy_(acc)
        k = x.shape[0]
        if self.transposed:
            prod = scratch.get("rotation-prod", torch.float32, (m.shape[0], k))
            torch.mm(m, x.t(), out=prod)
            prod = prod.t()
        else:
            prod = scratch.get("rotation-prod", torch.float32, (k, m.shape[1]))
            torch.mm(x, m, out=prod)
        acc.copy_(prod[:n])
        self.scale_rows(acc, r0)
