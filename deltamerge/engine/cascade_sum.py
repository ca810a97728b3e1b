"""torch's CPU ``sum(dim=0)`` of fp32 rows, in torch's order of additions, a block of rows at a time.

Alpaca's ``smart_tokenizer_and_embedding_resize`` starts each added row at
``embeddings[:-n].mean(dim=0, keepdim=True)`` of the model loaded in fp32. On the CPU that mean
is ``sum`` then ``div_`` by the row count, and the sum (ATen's ``cascade_sum``, in
``native/cpu/SumKernel.cpp``) is no single running sum: an fp64 sum rounded once differs from it
in the last bits of most elements. For a contiguous (rows, width) tensor each column is summed by
``multi_row_sum``:

* level 0 adds ``2**p`` rows in turn, ``p = max(4, ceil(log2(rows)) // 4)`` (16 rows for up to
  65536 rows); after each such run level 1 takes level 0 in and level 0 restarts at zero; level 1
  likewise passes into level 2 every ``2**(2p)`` rows, level 2 into level 3 every ``2**(3p)``;
  level 3 keeps adding;
* the rows after the last whole run go into level 0, then levels 1, 2 and 3 are added to it.

That is the order of the columns in whole groups of 32 (four vectors of 8 floats, the loop's
width in torch's x86 kernels, AVX-512 builds included); every LLaMA width is a multiple of 32, so
it is every column there. The columns after the last group are summed as ``row_sum`` does: four
cascades over the interleaved rows ``4m + k``, the rows past the last four added to the first,
then the other three. Widths under 8 group columns by 4 instead of 32. torch splits the columns
between threads at multiples of 32, so its thread count changes nothing for widths of whole
groups. A width of 1 (a vector, which torch sums as one contiguous row) is not reproduced.
"""

from __future__ import annotations

import torch

_LEVELS = 4
_LANES = 8  # floats in one of torch's vectors here
_GROUP = 4 * _LANES  # columns that multi_row_sum sums together


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length() if n > 1 else 0


class _Cascade:
    """``multi_row_sum`` over ``rows`` rows of ``width`` columns, fed in order in any blocks."""

    def __init__(self, rows: int, width: int):
        self.power = max(4, _ceil_log2(rows) // _LEVELS)
        self.run = 1 << self.power
        self.levels = [torch.zeros(width) for _ in range(_LEVELS)]
        self.done = 0

    def add(self, rows: torch.Tensor) -> None:
        # One row at a time: a row is too small for torch to split between threads, which makes
        # this as fast as adding many rows at once and keeps it off the engine's cores.
        level0 = self.levels[0]
        for r in range(rows.shape[0]):
            level0 += rows[r]
            self.done += 1
            if self.done % self.run == 0:
                self._carry()

    def _carry(self) -> None:
        mask = self.run - 1
        for j in range(1, _LEVELS):
            self.levels[j] += self.levels[j - 1]
            self.levels[j - 1].zero_()
            if self.done & (mask << (j * self.power)):
                break

    def total(self) -> torch.Tensor:
        total = self.levels[0].clone()
        for level in self.levels[1:]:
            total += level
        return total


class _Interleaved:
    """``row_sum``: four cascades over rows ``4m + k``, then the leftover rows, then the rest."""

    def __init__(self, rows: int, width: int):
        self.whole = rows // 4 * 4
        self.streams = [_Cascade(rows // 4, width) for _ in range(4)]
        self.leftover: list[torch.Tensor] = []
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        inside = max(0, min(rows.shape[0], self.whole - self.seen))
        for k, stream in enumerate(self.streams):
            stream.add(rows[(k - self.seen) % 4 : inside : 4])
        self.leftover.extend(row.clone() for row in rows[inside:])
        self.seen += rows.shape[0]

    def total(self) -> torch.Tensor:
        total = self.streams[0].total()
        for row in self.leftover:
            total += row
        for stream in self.streams[1:]:
            total += stream.total()
        return total


class TorchRowSum:
    """The sum over the rows of a (rows, width) fp32 tensor, bit for bit as torch's CPU sum."""

    def __init__(self, rows: int, width: int):
        group = _GROUP if width >= _LANES else 4
        split = width // group * group
        self.rows, self.width, self.fed = rows, width, 0
        self.parts: list[tuple[slice, _Cascade | _Interleaved]] = [
            (columns, summer) for columns, summer in (
                (slice(0, split), _Cascade(rows, split)),
                (slice(split, width), _Interleaved(rows, width - split)),
            ) if columns.stop > columns.start
        ]

    def add(self, block: torch.Tensor) -> None:
        """The next rows, in order: fp32, shape (k, width)."""
        for columns, summer in self.parts:
            summer.add(block[:, columns])
        self.fed += block.shape[0]

    def total(self) -> torch.Tensor:
        assert self.fed == self.rows, "every row must be added before the total is taken"
        out = torch.zeros(self.width)
        for columns, summer in self.parts:
            out[columns] += summer.total()
        return out

    def mean(self) -> torch.Tensor:
        """``sum(dim=0).div_(rows)``, as torch's CPU ``mean(dim=0)`` computes it."""
        return self.total().div_(self.rows)
