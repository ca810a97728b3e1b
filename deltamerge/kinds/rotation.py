"""What peft's multiplicative adapters (OFT, BOFT, HRA) share: the weight times a square matrix.

Their merges multiply the weight by an ``in x in`` fp32 matrix ``M`` built from the adapter's
small tensors: OFT and BOFT on a Linear layer compute ``torch.mm(M, fp32(W).t()).t()`` (``W @
M^T``), OFT on an embedding and HRA ``torch.mm(fp32(W), M)``, then round once to the weight's
dtype (BOFT scales the rows by ``boft_s`` first). Row ``i`` of the result needs row ``i`` of
``W`` and all of ``M``, so the rows stream; column ``j`` of it needs only ``M``'s row ``j``
(``W @ M^T``) or column ``j`` (``W @ M``), so ``M`` need not be whole either. Where it fits
``HOLD_BYTES`` (an input of up to 4096: 7B's) it is built once per tensor,
whole, as peft builds it, and each block of rows is multiplied by it; a wider one (13B's 5120, and
its ``down_proj``: 13824, 729 MiB) is built ``WINDOW`` of the result's columns at a time
(``window``: the same values, from the adapter's blocks or reflections) for every block of
rows, and each block is multiplied window by window.

The bits are peft's because each product is the same MKL call with the same operand layout on
fewer rows or columns: each output element's sum over ``in`` is the same, except in MKL's
kernels for products of fewer than 12 rows, which sum in another order, and for windows of
fewer than 8 (measured with MKL 2024.2 on AVX2, inputs 64 to 13824 wide, fp16/bf16/fp32 rows,
against peft's whole product). So a piece of fewer than ``MIN_ROWS`` rows is padded with zero
rows up to that, a tensor of fewer rows than that is one block (``row_multiple``) multiplied
whole, as peft multiplies it, and no window is narrower than ``MIN_ROWS``.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from . import Scratch
from .adapter import RowDelta

MIN_ROWS = 16  # rows every product has (padded), so MKL sums each element as for the whole
HOLD_BYTES = 64 * 1024 * 1024  # M held whole up to this (fp32); wider ones go by windows
# (building a held M takes about three times its size: 13B's 5120-wide HRA peaked at 758 MiB)
WINDOW = 256  # the result's columns per window of M, when M is not held


def windows(width: int, size: int) -> list[tuple[int, int]]:
    """``[a, b)`` covering ``range(width)`` by ``size``; the last one moved back to overlap its
    neighbour rather than be narrower than ``MIN_ROWS`` (its columns are computed twice, alike)."""
    size = max(size, MIN_ROWS)
    spans = [(a, min(width, a + size)) for a in range(0, width, size)]
    a, b = spans[-1]
    if b - a < MIN_ROWS:
        spans[-1] = (max(0, b - MIN_ROWS), b)
    return spans


def block_rows(blocks: torch.Tensor, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[a, b)`` of ``torch.block_diag(*blocks)`` (square blocks of one size), the same
    values (each copied) and zeros, without the rest of it (into ``out``, when given)."""
    size = blocks.shape[-1]
    rows = torch.arange(a, b)
    if out is None:
        out = torch.zeros(b - a, blocks.shape[0] * size, dtype=blocks.dtype)
    else:
        out.zero_()
    cols = (rows // size * size).unsqueeze(1) + torch.arange(size)
    out[(rows - a).unsqueeze(1), cols] = blocks[rows // size, rows % size]
    return out


class RotationDelta(RowDelta):
    """Rows of ``cast(W @ M^T)`` (``transposed``: peft's Linear layout) or ``cast(W @ M)``."""

    def __init__(self, source, parts, rows: int, transposed: bool, width: int):
        super().__init__(source, parts)
        self.rows = rows
        self.transposed = transposed
        self.width = width  # M is width x width (the weight's inputs)
        self.row_multiple = rows if 0 < rows < MIN_ROWS else 1
        self.held = width * width * 4 <= HOLD_BYTES

    @abstractmethod
    def setup(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put into ``tensors`` what ``matrix`` and ``window`` are built from (fp32)."""

    @abstractmethod
    def matrix(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``M``, fp32, computed from the module's parameters as peft computes it."""

    @abstractmethod
    def window(self, tensors: dict[str, torch.Tensor], a: int, b: int, scratch: Scratch) -> torch.Tensor:
        """What gives the result's columns ``[a, b)``: ``M``'s rows ``[a, b)`` (``transposed``)
        or its columns, contiguous, each value equal to that of ``matrix``; built in
        ``scratch``'s buffers (fresh ones for every window, freed by a compute thread, stay in
        its malloc arena: measured 13B's HRA at 542 MiB so, 381 MiB with buffers reused)."""

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        self.setup(tensors)
        if self.held:
            tensors["matrix"] = self.matrix(tensors)

    def scale_rows(self, prod: torch.Tensor, r0: int) -> None:  # noqa: B027 - optional hook
        """Change the fp32 product of rows ``r0..`` in place before it is rounded (BOFT)."""

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        self.merge(acc, acc, r0, scratch)

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch) -> None:
        """The block's rows in fp32 (padded), multiplied by ``M`` whole or window by window,
        each window's columns rounded into ``out``.

        With ``M`` held, the block's rows are cut into one piece per thread of the run's pool
        (``--threads``), each at least ``MIN_ROWS`` rows and multiplied on its own thread in
        buffers of its own: each row's product is the same MKL sum whatever rows share its call,
        so the bits do not depend on the thread count. Windows of ``M`` are built in shared
        buffers, so a wide ``M`` keeps one thread."""
        tensors = self.tensors()
        n = out.shape[0]
        pool = self.source.pool
        size = max(MIN_ROWS, -(-n // pool.threads))
        if not self.held or pool.threads == 1 or n < 2 * MIN_ROWS:
            self._merge_rows(tensors, cur, out, r0, scratch, "")
            return
        starts = range(0, n, size)
        pool.map(lambda job: self._merge_rows(tensors, *job), [
            (cur[a : a + size], out[a : a + size], r0 + a, scratch, str(j)) for j, a in enumerate(starts)
        ])

    def _merge_rows(
        self, tensors: dict[str, torch.Tensor], cur: torch.Tensor, out: torch.Tensor, r0: int,
        scratch: Scratch, key: str,
    ) -> None:
        """Rows ``r0..`` of the merge in ``scratch``'s buffers named with ``key`` (a piece's own)."""
        n = out.shape[0]
        k = MIN_ROWS if n < MIN_ROWS <= self.rows else n
        x = scratch.get("rotation-rows" + key, torch.float32, (k, self.width))
        x[n:].zero_()
        x[:n].copy_(cur)
        spans = [(0, self.width)] if self.held else windows(self.width, WINDOW)
        for a, b in spans:
            m = tensors["matrix"] if self.held else self.window(tensors, a, b, scratch)
            if self.transposed:
                prod = scratch.get("rotation-prod" + key, torch.float32, (b - a, k))
                torch.mm(m, x.t(), out=prod)
                prod = prod.t()
            else:
                prod = scratch.get("rotation-prod" + key, torch.float32, (k, b - a))
                torch.mm(x, m, out=prod)
            piece = prod[:n]
            self.scale_rows(piece, r0)
            out[:, a:b].copy_(piece)
