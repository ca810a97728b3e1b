"""bitsandbytes' NF4 round trip ``dequantize_4bit(quantize_4bit(W))``, bit for bit, a row block at a time.

QLoRA adapters (Guanaco) were trained against the 4-bit base ``dequant(NF4(W))``, not ``W``;
merging one into ``W`` adds the quantization error back. This module recomputes what
bitsandbytes 0.50 computes on CPU for ``quant_type="nf4"``, ``blocksize=64``, ``quant_storage=
uint8``, with and without double quantization (``compress_statistics``), in plain torch (and,
with ``cuda=True``, what its CUDA kernels compute instead, below):

* ``quantize_4bit`` (bitsandbytes' default backend, which CPU tensors use): the tensor is
  flattened and cut into blocks of 64; each block's ``absmax = max|x|`` in fp32; full blocks are
  scaled by ``x * reciprocal(max(absmax, 1e-38))``, the last, shorter block (if any) by
  ``x / max(absmax, 1e-38)``, and that block's stored absmax is the clamped one; the scaled value
  is clamped to [-1, 1] and takes the index of the first NF4 value whose fp32 midpoint with the
  next is not below it (``bucketize``: a tie goes to the smaller value).
* double quantization: ``offset = mean(absmax)`` over the whole tensor, then ``absmax - offset``
  is quantized by the CPU kernel ``quantize_blockwise`` in blocks of 256 with the signed 8-bit
  dynamic map. That kernel does not pick the nearest code: it maps ``v = x * (1 / max|x|)`` to
  ``int((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`` and looks the code up in a 65536-entry
  table built from the map's midpoints. Dequantizing gives ``code[q] * absmax2 + offset``.
* ``dequantize_4bit``: ``NF4[q] * absmax`` in fp32, rounded (to nearest even) to the dtype the
  tensor was quantized in. (bitsandbytes' AVX-512 kernel indexes absmax per row, which is wrong
  when a row is not a whole number of blocks; the flat indexing here is what its own
  quantization, its scalar and default kernels, and CUDA use.)

Quantization blocks run along the flattened tensor, so a block of rows gives the same bits as the
whole tensor when it starts on a block boundary: every row block but the last must hold a
multiple of 64 elements (:func:`row_multiple`, :func:`aligned_rows`). Double quantization's
offset is the mean of every block's absmax, so it needs a first pass over the tensor
(:class:`Nf4Prepare`, one fp32 value per 64 elements) before the round trip can start.

The offset is torch's fp32 ``mean``, as in bitsandbytes, which makes bitsandbytes' own result
depend on torch's thread count for tensors of over 2M elements (32768 blocks); here it is always
the one-thread mean (``compute_pool.one_torch_thread``: with more threads torch splits sums of
over 32768 values between them, so the offset would depend on the thread count).

QLoRA quantized on GPUs, where bitsandbytes runs its CUDA kernels (``csrc/kernels.cu``, the same
in 0.50.1 and on its main branch a week later), whose rules differ; ``cuda=True`` follows them:

* ``kQuantizeBlockwise`` (8 bits, double quantization's scales) does not look a table up: its
  ``dQuantize`` walks a binary search over the 256 sorted codes to a leaf (always an even index
  ``p``, with ``code[p-1] < v <= code[p+1]``) and returns the nearer of ``p`` and its neighbour
  by the fp32 midpoint ``(a + b) * 0.5f``; a value on a midpoint goes to ``p``, the even index
  of the two (:func:`nearest_code`). On a 4096 x 11008 tensor 0.15% of the codes differ from
  the CPU's.
* every block, the last and shorter one too, is scaled by ``x * (1.0f / absmax)``: there is no
  clamp, so a block of zeros scales to NaN, which every comparison of ``dQuantize`` and of
  ``dQuantizeNF4``'s tree sends to code 0 (NF4 -1.0: zero times its scale, or minus the
  dequantized scale under double quantization), and its absmax is stored as 0.
* ``dQuantizeNF4``'s tree compares with thresholds equal (as fp32) to the midpoints above.

Two things of a GPU's run are not reproduced here. bitsandbytes builds its CUDA kernels with
``--use_fast_math``, so its ``1.0f / absmax`` is the hardware's approximate reciprocal (at most
one ulp from the correctly rounded one used here): a value within an ulp of a midpoint may take
the other code where the two differ. And torch's CUDA ``mean`` sums the absmax in another order
than its CPU's, so the offset may differ in its last bit. Neither was checked on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from ..compute_pool import one_torch_thread
from ..errors import InputError

BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements scaled, looked up and multiplied at once: bounds the scratch whatever the block size.
CHUNK = 1 << 18
_CLAMP = 1e-38  # bitsandbytes' floor for the divisor (a subnormal in fp32)
_LUT_SIZE = 65536
_CELLS = 64  # NF4 midpoints are at least 0.08 apart: at most one per cell of 1/64

# bitsandbytes' NF4 code (get_4bit_type("nf4")): quantiles of N(0, 1) scaled to [-1, 1].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@cache
def nf4_code() -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32)


@cache
def _nf4_bounds() -> torch.Tensor:
    """The fp32 midpoints bitsandbytes compares with: ``(code[i] + code[i + 1]) / 2``."""
    code = nf4_code()
    return (code[:-1] + code[1:]) / 2


def _cell(scaled: torch.Tensor) -> torch.Tensor:
    """A monotone cell index, ``_CELLS`` cells per unit over [-1, 1]; values outside go to the ends."""
    return torch.add(scaled, 1.0).mul_(float(_CELLS)).to(torch.int32).clamp_(0, 2 * _CELLS)


@cache
def _cell_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell: how many midpoints lie in cells below it, and the midpoint that may lie in it.

    ``_cell`` is monotone, so a midpoint in a lower cell is below every value of the cell and one
    in a higher cell above it; no two midpoints share a cell, so one comparison settles the rest.
    """
    bounds = _nf4_bounds()
    cells = _cell(bounds).tolist()
    assert len(set(cells)) == len(cells), "two NF4 midpoints in one cell"
    below = torch.searchsorted(torch.tensor(cells, dtype=torch.int64),
                               torch.arange(2 * _CELLS + 1), right=False).to(torch.int32)
    ext = torch.cat([bounds, torch.tensor([float("inf")])])
    return below, ext


def nf4_index(scaled: torch.Tensor) -> torch.Tensor:
    """``bucketize(scaled, midpoints)`` (int32): the count of NF4 midpoints below each value.

    Equal to bitsandbytes' ``bucketize`` for every value (a tie goes to the smaller code), in a
    fraction of its time: two table look-ups and one comparison per value.
    """
    below, ext = _cell_tables()
    lo = below.index_select(0, _cell(scaled).view(-1)).view(scaled.shape)
    return lo.add_(torch.gt(scaled, ext.index_select(0, lo.view(-1)).view(scaled.shape)))


@cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map()`` (signed, 7 exponent bits, 8 bits), sorted."""
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _dynamic_lut() -> torch.Tensor:
    """The CPU kernel's table: grid point ``i`` of [-1, 1] -> how many code midpoints lie below it."""
    code = dynamic_code()
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid, grid, right=False).to(torch.uint8)


def row_multiple(row_numel: int) -> int:
    """Rows per block must be a multiple of this for every block to start on a 64-element boundary."""
    return BLOCKSIZE // math.gcd(BLOCKSIZE, row_numel)


def aligned_rows(rows: int, row_numel: int) -> int:
    """``rows`` rounded down to a valid rows-per-block (at least one multiple)."""
    m = row_multiple(row_numel)
    return max(m, rows // m * m)


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in DTYPES:
        raise InputError(f"{what}: NF4 quantizes float16, bfloat16 or float32, not {dtype}")


def _flat_range(rows: torch.Tensor, r0: int, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Where ``rows`` (rows ``r0...`` of a tensor of ``shape``) lie in the flattened tensor."""
    row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
    numel = math.prod(shape)
    start, n = r0 * row_numel, rows.numel()
    if start % BLOCKSIZE or (start + n != numel and n % BLOCKSIZE):
        raise InputError(
            f"rows from {r0} ({n} elements at {start}) do not start and end on NF4 blocks of "
            f"{BLOCKSIZE}: use rows per block that are a multiple of {row_multiple(row_numel)}"
        )
    if start + n > numel:
        raise InputError(f"rows from {r0} run past the tensor's {numel} elements")
    return start, n, numel


def block_absmax(flat: torch.Tensor, cuda: bool = False) -> torch.Tensor:
    """Per-block ``max|x|`` (fp32) of ``flat``, which starts on a block boundary.

    A last block shorter than 64 is the tensor's last, whose absmax bitsandbytes' CPU code clamps
    (its CUDA kernel does not).
    """
    x = flat.reshape(-1)
    n = x.numel()
    full = n - n % BLOCKSIZE
    absmax = x[:full].view(-1, BLOCKSIZE).abs().amax(dim=1).to(torch.float32)
    if full < n:
        tail = x[full:].abs().max().to(torch.float32)
        absmax = torch.cat([absmax, tail.view(1) if cuda else tail.clamp(min=_CLAMP).view(1)])
    return absmax


def quantize(flat: torch.Tensor, cuda: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 indices (int32, one per element, 0..15) and per-block absmax (fp32) of ``flat``."""
    x = flat.reshape(-1).to(torch.float32)
    n = x.numel()
    full = n - n % BLOCKSIZE
    absmax = block_absmax(x, cuda)
    com = x[:full].view(-1, BLOCKSIZE)
    divisor = absmax[: full // BLOCKSIZE]
    scale = (divisor if cuda else divisor.clamp(min=_CLAMP)).reciprocal().view(-1, 1)
    # bitsandbytes clamps the scaled values to [-1, 1]; every midpoint lies inside, so that
    # changes no index, and is left out.
    codes = nf4_index((com * scale).view(-1))
    if full < n:
        tail = x[full:] * absmax[-1].reciprocal() if cuda else x[full:] / absmax[-1]
        codes = torch.cat([codes, nf4_index(tail)])
    if cuda:  # a block of zeros scaled to NaN: the kernel's tree answers code 0
        codes.view(-1)[:full].view(-1, BLOCKSIZE)[divisor == 0] = 0
        if full < n and absmax[-1] == 0:
            codes[full:] = 0
    return codes, absmax


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``NF4[codes] * scale`` per block of 64 in fp32, rounded once to ``dtype``."""
    vals = nf4_code().index_select(0, codes.view(-1))
    n = vals.numel()
    full = n - n % BLOCKSIZE
    out = torch.empty(n, dtype=torch.float32)
    torch.mul(vals[:full].view(-1, BLOCKSIZE), scale[: full // BLOCKSIZE].view(-1, 1),
              out=out[:full].view(-1, BLOCKSIZE))
    if full < n:
        torch.mul(vals[full:], scale[full // BLOCKSIZE], out=out[full:])
    return out.to(dtype)


@cache
def _dynamic_midpoints() -> torch.Tensor:
    """The CUDA kernel's fp32 midpoints between neighbouring codes, ``(a + b) * 0.5f``."""
    code = dynamic_code()
    return (code[:-1] + code[1:]) * 0.5


def nearest_code(v: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel's ``dQuantize``: the nearest 8-bit code (uint8) of each fp32 value.

    A value on a midpoint goes to the even index of its two codes (where the kernel's search
    ends); NaN, which fails every comparison, to code 0.
    """
    mids = _dynamic_midpoints()
    k = torch.searchsorted(mids, v.contiguous(), right=False)
    on = torch.eq(v, mids.index_select(0, k.clamp(max=mids.numel() - 1).view(-1)).view(v.shape))
    k.add_(on & (k % 2 == 1))
    k[torch.isnan(v)] = 0
    return k.to(torch.uint8)


def quantize_8bit(x: torch.Tensor, cuda: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``quantize_blockwise(x, blocksize=256)`` (fp32 ``x``): codes and absmax.

    On CPU the kernel's table look-up, not the nearest code: ``v = x * (1 / absmax)`` picks grid
    point ``int((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)``; a block of zeros takes code 0. With
    ``cuda`` the CUDA kernel's nearest code of ``v`` (:func:`nearest_code`).
    """
    n = x.numel()
    nblocks = -(n // -ABSMAX_BLOCKSIZE)
    v = torch.zeros(nblocks * ABSMAX_BLOCKSIZE, dtype=torch.float32)
    v[:n] = x.reshape(-1)
    blocks = v.view(nblocks, ABSMAX_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    if cuda:
        blocks.mul_(absmax.reciprocal().view(-1, 1))
        return nearest_code(v)[:n], absmax
    blocks.mul_(1.0 / absmax.view(-1, 1)).clamp_(-1.0, 1.0)
    v.add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5).nan_to_num_(0.0)
    index = v.to(torch.int32).clamp_(0, _LUT_SIZE - 1)
    codes = _dynamic_lut().index_select(0, index).view(nblocks, ABSMAX_BLOCKSIZE)
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def quantize_absmax(
    absmax: torch.Tensor, cuda: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (8-bit codes, their per-256 absmax, the offset ``mean(absmax)``)."""
    with one_torch_thread():  # bitsandbytes' offset as one torch thread sums it
        offset = absmax.mean()
    codes, absmax2 = quantize_8bit(absmax - offset, cuda)
    return codes, absmax2, offset


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``code[q] * absmax2`` per block of 256 in fp32, then ``+ offset``: the scales NF4 uses."""
    n = codes.numel()
    nblocks = absmax2.numel()
    vals = torch.zeros(nblocks * ABSMAX_BLOCKSIZE, dtype=torch.float32)
    vals[:n] = dynamic_code().index_select(0, codes.to(torch.int32))
    vals.view(nblocks, ABSMAX_BLOCKSIZE).mul_(absmax2.view(-1, 1))
    return vals[:n].add_(offset)


@dataclass(frozen=True)
class Nf4State:
    """What the round trip of one tensor needs beyond its rows.

    ``scale`` is the per-block fp32 scale ``dequantize_4bit`` multiplies by: the dequantized
    absmax under double quantization, ``None`` without it (each block's own absmax, recomputed
    from the rows). ``absmax_codes``, ``absmax2`` and ``offset`` are bitsandbytes' nested
    ``QuantState`` (``absmax``, ``state2.absmax``, ``offset``), kept for comparison.
    """

    shape: tuple[int, ...]
    double_quant: bool
    cuda: bool = False  # bitsandbytes' CUDA kernels' rules, not its CPU code's
    scale: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None


class Nf4Prepare:
    """The first pass over one tensor: each block's absmax, for double quantization's offset.

    Feed it every row block once (in any order, each aligned as :func:`aligned_rows` says), then
    :meth:`finish`. Without double quantization no rows are needed. It holds one fp32 value per
    64 elements (2.8 MB for a 4096 x 11008 tensor).
    """

    def __init__(
        self, shape: tuple[int, ...], double_quant: bool, name: str = "tensor", cuda: bool = False
    ):
        self.shape = tuple(shape)
        self.double_quant = double_quant
        self.name = name
        self.cuda = cuda
        numel = math.prod(self.shape)
        nblocks = -(numel // -BLOCKSIZE)
        self.absmax = torch.empty(nblocks if double_quant else 0, dtype=torch.float32)
        self._seen = 0

    def add(self, rows: torch.Tensor, r0: int) -> None:
        if not self.double_quant:
            return
        _check_dtype(rows.dtype, self.name)
        start, n, _ = _flat_range(rows, r0, self.shape)
        flat = rows.reshape(-1)
        for c0 in range(0, n, CHUNK):
            absmax = block_absmax(flat[c0 : c0 + CHUNK], self.cuda)
            b0 = (start + c0) // BLOCKSIZE
            self.absmax[b0 : b0 + absmax.numel()] = absmax
        self._seen += n

    def finish(self) -> Nf4State:
        if not self.double_quant:
            return Nf4State(self.shape, False, self.cuda)
        numel = math.prod(self.shape)
        if self._seen != numel:
            raise InputError(
                f"{self.name}: the NF4 first pass saw {self._seen} of {numel} elements"
            )
        codes, absmax2, offset = quantize_absmax(self.absmax, self.cuda)
        self.absmax = torch.empty(0)
        scale = dequantize_absmax(codes, absmax2, offset)
        return Nf4State(self.shape, True, self.cuda, scale, codes, absmax2, offset)


def nf4_roundtrip(
    rows: torch.Tensor, state: Nf4State, r0: int, dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(W))`` for rows ``[r0, r0 + len(rows))`` of W.

    The result is in ``dtype``, by default ``rows.dtype``: bitsandbytes dequantizes into the
    dtype it quantized from. Quantizing ``W.float()`` gives the same 4-bit codes as ``W``, so
    ``dtype=torch.float32`` on fp16 rows is the round trip of a base loaded in fp32.
    """
    _check_dtype(rows.dtype, "rows")
    dtype = dtype or rows.dtype
    _check_dtype(dtype, "the dequantized dtype")
    start, n, _ = _flat_range(rows, r0, state.shape)
    if out is None:
        out = torch.empty(rows.shape, dtype=dtype)
    flat_in, flat_out = rows.reshape(-1), out.view(-1)
    for c0 in range(0, n, CHUNK):
        c1 = min(n, c0 + CHUNK)
        codes, absmax = quantize(flat_in[c0:c1], state.cuda)
        if state.scale is not None:
            b0 = (start + c0) // BLOCKSIZE
            absmax = state.scale[b0 : b0 + absmax.numel()]
        flat_out[c0:c1] = dequantize(codes, absmax, dtype)
    return out


def nf4_roundtrip_tensor(
    w: torch.Tensor, double_quant: bool, dtype: torch.dtype | None = None, cuda: bool = False
) -> torch.Tensor:
    """The whole tensor's round trip (both passes at once): for tests and small tensors."""
    prep = Nf4Prepare(tuple(w.shape), double_quant, cuda=cuda)
    prep.add(w, 0)
    return nf4_roundtrip(w, prep.finish(), 0, dtype)
