"""A truncated SVD of ``target - base`` per weight matrix, read a block of rows at a time.

mergekit's ``mergekit-extract-lora`` loads each difference whole in fp32 and calls
``torch.linalg.svd`` on it: exact, but a 70B-wide layer is about 1 GB in fp32 and its full SVD
is most of the run's time. Here the difference ``D`` (m x n) is only ever used through thin
products, ``D @ X`` and ``D.T @ Y`` with ``k = rank + oversampling(rank)`` columns (twice the
rank, at least rank + 10), each made in one pass over D's rows: a block of base and target
rows is read, subtracted in fp32, multiplied, and dropped. That is Halko, Martinsson and
Tropp's randomized range finder with power iterations (2011, algorithms 4.4 and 5.1):
``Y = D @ Omega`` for a Gaussian ``Omega``, then ``Y = D @ orth(D.T @ orth(Y))`` per power
iteration (each sharpens the spectrum's decay, so the subspace found nears the top singular
vectors), then ``B = orth(Y).T @ D`` and the SVD of that k x n matrix. Memory is
``(m + n) x k`` floats and one block; a matrix is read ``2 + 2 * power_iterations`` times.

``Omega`` comes from a generator seeded by the tensor's name, so the same inputs and block size
give the same bits (every product sums the blocks in the same order). The factors split the
singular values as mergekit does, ``B = U sqrt(S)`` and ``A = sqrt(S) V.T``, so that with
``lora_alpha = r`` peft's scale is 1 and ``B @ A`` is the rank-r approximation.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dtypes import BITS_DTYPE, itemsize
from ..errors import FormatError
from ..sources import Checkpoint

POWER_ITERATIONS = 2  # with oversampling(rank), within 1% of the full SVD's on fine-tune deltas
OVERSAMPLE = 10  # the fewest extra columns of the range finder beyond the rank
MAX_OVERSAMPLE = 64  # the most: 2 x 128 columns took a LLaMA-2-70B-wide layer to 523 MiB
SEED = 20240  # with the tensor's name, seeds its Omega


@dataclass
class Factorization:
    """One matrix's LoRA factors (fp32) and what they leave out."""

    lora_a: torch.Tensor  # r x n: sqrt(S) V.T
    lora_b: torch.Tensor  # m x r: U sqrt(S)
    norm_sq: float  # ||D||_F^2
    captured_sq: float  # the sum of the r singular values squared: ||D||^2 - error^2

    @property
    def relative_error(self) -> float:
        """``||D - B @ A||_F / ||D||_F`` before the factors are rounded to the model's dtype
        (``B @ A`` is D projected on r orthonormal directions: what it misses is the rest)."""
        if self.norm_sq <= 0:
            return 0.0
        return math.sqrt(max(self.norm_sq - self.captured_sq, 0.0) / self.norm_sq)


class _Rows:
    """The difference's rows, block by block, in reused buffers."""

    def __init__(self, base: Checkpoint, target: Checkpoint, name: str, block_bytes: int):
        self.base, self.target, self.name = base, target, name
        spec = base.specs[name]
        self.rows, self.cols = spec.shape
        # two fp32 buffers, the difference and the base rows widened, share the block's bytes
        self.step = max(1, block_bytes // (8 * max(self.cols, 1)))
        raw = self.step * self.cols * itemsize(spec.dtype)
        self._base_buf = torch.empty(raw, dtype=torch.uint8)
        self._target_buf = torch.empty(raw, dtype=torch.uint8)
        self._diff = torch.empty(self.step * self.cols, dtype=torch.float32)
        self._wide = torch.empty(self.step * self.cols, dtype=torch.float32)

    def blocks(self, on_base: Callable[[torch.Tensor], None] | None = None, last: bool = False):
        """``(r0, r1, D[r0:r1] in fp32, whether those rows' bits differ)`` for every block.

        Except in a ``last`` pass, the pages read stay in the page cache (not this process's
        memory), so that the passes after it read them from there rather than from the disk
        again; the first pass drops them (the matrix may turn out to be unchanged), so the
        second reads from the disk and the last drops them again."""
        for ckpt in (self.base, self.target):
            ckpt.drop_behind = last
        try:
            yield from self._blocks(on_base)
        finally:
            for ckpt in (self.base, self.target):
                ckpt.drop_behind = True

    def _blocks(self, on_base: Callable[[torch.Tensor], None] | None):
        for r0 in range(0, self.rows, self.step):
            r1 = min(self.rows, r0 + self.step)
            b = self.base.read_rows(self.name, r0, r1, self._base_buf)
            t = self.target.read_rows(self.name, r0, r1, self._target_buf)
            if on_base is not None:
                on_base(b)
            bits = BITS_DTYPE[b.element_size()]
            differ = not torch.equal(b.view(bits), t.view(bits))
            d = self._diff[: (r1 - r0) * self.cols].view(r1 - r0, self.cols)
            d.copy_(t)
            d.sub_(self._wide[: d.numel()].view_as(d).copy_(b))
            yield r0, r1, d, differ


def oversampling(rank: int) -> int:
    """The range finder's columns beyond the rank: as many as the rank (at least OVERSAMPLE, at
    most MAX_OVERSAMPLE).

    A fine-tune's difference has a flat spectrum, so the error depends on how far past the
    rank the sample reaches. On Gemma 3 270M's full fine-tune (docs/performance.md) a fixed 10
    left rank 64's errors 1.0 to 1.5% above the full SVD's, every kind of matrix; ``rank``
    columns leave 0.1 to 0.2%, for thin products twice as wide and no more passes over the
    weights (a third power iteration would read every matrix twice more). Past rank 64 the
    extra columns stop at 64, where the sample's ``(m + n) x k`` floats keep the peak at 70B
    widths under 512 MiB."""
    return max(OVERSAMPLE, min(rank, MAX_OVERSAMPLE))


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def factorize(
    base: Checkpoint, target: Checkpoint, name: str, rank: int, block_bytes: int,
    power_iterations: int = POWER_ITERATIONS, oversample: int | None = None,
    on_base: Callable[[torch.Tensor], None] | None = None,
) -> Factorization | None:
    """The rank-``rank`` factors of ``target[name] - base[name]`` (a 2-D weight), or None when
    the two are the same bits. ``on_base`` is given each block of base rows once, in order (the
    manifest hashes the base from these reads). ``oversample`` defaults to ``oversampling(rank)``."""
    rows = _Rows(base, target, name, block_bytes)
    m, n = rows.rows, rows.cols
    oversample = oversampling(rank) if oversample is None else oversample
    k, r = min(rank + oversample, m, n), min(rank, m, n)
    generator = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
    omega = torch.randn(n, k, generator=generator, dtype=torch.float32)
    y = torch.empty(m, k, dtype=torch.float32)
    norm_sq, changed = 0.0, False
    for r0, r1, d, differ in rows.blocks(on_base, last=True):  # dropped: it may be unchanged
        changed = changed or differ
        norm_sq += float(torch.linalg.vector_norm(d)) ** 2  # fp32: a float64 copy would double the block
        torch.mm(d, omega, out=y[r0:r1])
    if not changed or norm_sq == 0:  # the same bits, or only zeros of the other sign
        return None
    if not math.isfinite(norm_sq):
        raise FormatError(f"{target.file_of(name)}: tensor {name!r} minus the base's holds NaN or "
                          "Inf: it has no low-rank approximation")
    for _ in range(power_iterations):
        z = _orth(_transposed(rows, _orth(y)))
        for r0, r1, d, _ in rows.blocks():
            torch.mm(d, z, out=y[r0:r1])
    q = _orth(y)
    bt = _transposed(rows, q, last=True)  # (Q.T @ D).T, n x k
    ub, s, vbh = torch.linalg.svd(bt, full_matrices=False)  # D ~ Q @ vbh.T @ diag(s) @ ub.T
    root = s[:r].sqrt()
    lora_b = (q @ vbh[:r].T).mul_(root)
    lora_a = (ub[:, :r] * root).T.contiguous()
    captured = float((s[:r].to(torch.float64) ** 2).sum())
    return Factorization(lora_a, lora_b, norm_sq, captured)


def _transposed(rows: _Rows, q: torch.Tensor, last: bool = False) -> torch.Tensor:
    """``D.T @ q``, the blocks' contributions summed in row order."""
    z = torch.zeros(rows.cols, q.shape[1], dtype=torch.float32)
    for r0, r1, d, _ in rows.blocks(last=last):
        z.addmm_(d.T, q[r0:r1])
    return z
