"""llama.cpp's row quantizers for GGUF, bit for bit: its k-quants ported to torch float32.

``llama-quantize`` without an importance matrix quantizes each row with the ``_ref`` functions of
``ggml/src/ggml-quants.c`` (``quantize_row_q4_K_ref`` ...): scalar float32 arithmetic, no fused
multiply-add in the x86-64 build. gguf-py has no k-quant quantizer, so they are ported here, each
256-value super-block independent of the others. Float32 results depend on the order of every
operation, so the port keeps the C code's: sums accumulate position by position within a block
(torch's ``sum`` only where it does too: ``_SeqSum``), divisions stay divisions (torch's
``float / tensor`` multiplies by a reciprocal), ``sqrtf`` is rounded from float64 (torch's float32
sqrt is not correctly rounded), and no op fuses a multiply with an add (no ``addcmul``, no ``alpha=``). The
work is vectorized across blocks, never within one; the trial scales of ``make_qkx2_quants`` and
``make_qx_quants`` go one after another on buffers reused from trial to trial, each trial's
per-block scalars computed together in a few ops (an op's own cost, not its arithmetic, is most of
a trial's time). ``nearest_int`` (the 1.5 * 2^23 trick) rounds in floats where its range holds and
is redone on the bits where it may not, and the ``(uint8_t)``/``(int8_t)`` wraps are kept, so the
bytes are the C code's on x86-64 for any input: ones whose ``max - min`` overflows, NaN and
infinities included.

Where numba imports, ``quantize_rows`` runs ``gguf_kquants_numba`` instead: the same C code compiled
statement by statement (its searches on lanes), 4-16x faster, the same bytes
(``DELTAMERGE_KQUANTS=torch`` forces this port).

The legacy types (Q4_0 ... Q8_0) are gguf-py's own quantizers, which ``convert_hf_to_gguf.py``
uses and which match ggml's ``quantize_row_*_ref``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from ..compute_pool import one_torch_thread
from ..registry import load
from .gguf_kv import require_gguf

try:
    import gguf
    import numpy as np
except ImportError:
    gguf = None
# Optional: numba compiles the k-quants. Its compiler costs about 100 MiB of memory, so it is
# loaded (through the registry's loader, as sinks are) when a run first quantizes a k-type, not
# for every GGUF output: f16 and q8_0 runs never load it.
_NUMBA_KERNELS = "deltamerge.sinks.gguf_kquants_numba"
_HAS_NUMBA = importlib.util.find_spec("numba") is not None

__all__ = ["kquants_backend", "quantize_rows"]

QK_K = 256
KQUANTS_ENV = "DELTAMERGE_KQUANTS"  # torch: the torch port even where numba imports (kquants_backend)
GROUP_MAX_EPS = 1e-15
_MAGIC = 12582912.0  # 1.5 * 2^23: nearest_int's rounding constant
# Super-blocks quantized together: enough that each op works on many blocks (an op's own cost is
# a few microseconds), few enough that the buffers stay small (about 6 MB for Q4_K) and mostly in
# cache (measured on 2 cores: 512 quantize 1.3x as fast as 256, 1.1x as fast as 1024).
_CHUNK_SUPERBLOCKS = 512
# torch's float sum adds this many rows one after another (``_seq_sum``), for columns in groups
# of 4 vectors: 32 floats with AVX2, 64 with AVX-512.
_SUM_RUN = 16
_SUM_COLUMNS = 64


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``f + 12582912.f``, read back as int32, low 23 bits less 2^22.

    Round half to even for |f| <= 4194303; beyond, and for NaN, the same bits the C code reads.
    """
    v = f + _MAGIC
    return (v.view(torch.int32) & 0x7FFFFF) - 0x400000


def _f16_bits(f: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16`` (round half to even, NaN as 0x7E00 with its sign), as int32 bits."""
    h = f.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    nan = torch.isnan(f)
    if bool(nan.any()):
        h = torch.where(nan, (f.view(torch.int32) >> 16 & 0x8000) | 0x7E00, h)
    return h


def _f16_value(bits: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32`` of the int32 bits (exact)."""
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


class _SeqSum:
    """``float s = 0; for (i...) s += terms[i];`` along dim 0 of ``terms`` (n, ...) into ``out``,
    vectorized over the rest, each time it is called (``terms`` is overwritten).

    A loop of ``add_`` costs an op per position, and ops, not arithmetic, are most of the time
    at these sizes. torch's float ``sum`` over the leading dim adds up to 16 rows one after
    another from zero (``multi_row_sum`` in ATen's ``native/cpu/SumKernel.cpp``: its level 0 is
    a running sum of 16 rows; see ``engine/cascade_sum.py``) and a 17th to that (``a + b`` is
    ``b + a``), for contiguous columns in whole groups of four vectors, on one thread. So 32
    positions are two sums: the first 16, written over row 15, then rows 15..31. Otherwise (other
    columns, more torch threads) the loop. The views are made once: the trials call it again
    and again.
    """

    def __init__(self, terms: torch.Tensor, out: torch.Tensor):
        self.out = out
        self.rows = terms.unbind(0)
        self.runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last: torch.Tensor | None = None
        if terms[0].numel() % _SUM_COLUMNS or not terms.is_contiguous() or torch.get_num_threads() != 1:
            return
        lo = 0
        while terms.shape[0] - lo > _SUM_RUN + 1:
            self.runs.append((terms[lo : lo + _SUM_RUN], torch.empty_like(out), terms[lo + _SUM_RUN - 1]))
            lo += _SUM_RUN - 1
        self.last = terms[lo:]

    def __call__(self) -> torch.Tensor:
        if self.last is None:
            self.out.zero_()
            for t in self.rows:
                self.out.add_(t)
            return self.out
        for run, head, carry in self.runs:
            carry.copy_(torch.sum(run, 0, out=head))
        return torch.sum(self.last, 0, out=self.out)


def _first_max(values: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``if (v[j] > best) best = v[j]`` over dim 0 from ``start``: (best, index of the winner or -1)."""
    best = start.clone()
    index = torch.full_like(start, -1, dtype=torch.int64)
    for j, v in enumerate(values):
        gt = v > best
        best = torch.where(gt, v, best)
        index = torch.where(gt, j, index)
    return best, index


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` as a division: torch's ``float / tensor`` multiplies by the reciprocal."""
    return torch.tensor(num, dtype=torch.float32) / t


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded: torch's float32 sqrt is not (the double's is, rounded once more)."""
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def _clamped_nearest(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32."""
    return nearest_int(f).clamp_(lo, hi).to(torch.float32)


def _levels_(f: torch.Tensor, lo: int, hi: int, exact: bool) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` in place, as float32.

    Unless ``exact``, it is done in floats, rounding half to even as ``f + 12582912.f`` does: the
    same for |f| <= 4194303, which the caller checks (beyond, only the bits give the C code's value).
    """
    if exact:
        return f.copy_(_clamped_nearest(f, lo, hi))
    return f.round_().clamp_(float(lo), float(hi))


def _out_of_range(iscale: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Blocks where some ``iscale * (x - at)``, x in [lo, hi], may be beyond nearest_int's range (or NaN)."""
    span = torch.maximum((hi - at).abs_(), (lo - at).abs_())
    return ~(iscale.abs() * span <= 4194303.0)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` for blocks as columns: ``x``, ``w`` (n, blocks).

    Returns (scale, the_min, L) with L (n, blocks) as float32 levels. The trials go one after
    another as in C, since a trial that wins moves ``min``, which the next trials' scales and
    levels start from; each is vectorized across the blocks. Levels are rounded in floats; where
    that could differ from ``nearest_int`` (NaN, infinities, values near float32's limits) all is
    done again on bits.
    """
    result = None
    if bool(torch.isfinite(x).all()):
        result = _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, exact=False)
    if result is None:
        result = _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, exact=True)
    assert result is not None
    return result


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    n, blocks = x.shape
    lo, mx = x[0].clone(), x[0].clone()
    for xi in x[1:]:  # comparisons in C's order, as NaNs make them matter
        lo = torch.where(xi < lo, xi, lo)
        mx = torch.where(xi > mx, xi, mx)
    # C starts sum_w at w[0] and sum_x at w[0]*x[0]; from zero is the same: w >= +0, and a -0
    # product is wiped out by the first nonzero one, which every block but a flat one has.
    terms = torch.empty(n, 2, blocks)
    terms[:, 0] = w
    torch.mul(w, x, out=terms[:, 1])
    sum_w, sum_x = _SeqSum(terms, torch.empty(2, blocks))()
    tmp = torch.empty(blocks)
    zero = torch.zeros(blocks)
    mn = torch.where(lo > 0, zero, lo)
    flat = mx == mn
    f32 = torch.float32
    steps = torch.arange(nstep + 1, dtype=f32)
    nums = (torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * steps) + float(nmax)
    # Each trial's iscale and min (row 0: the first fit's), to rebuild the winner's levels and to
    # check nearest_int's range once at the end.
    iscales = torch.empty(nstep + 2, blocks)
    mins = torch.empty(nstep + 2, blocks)
    iscale = torch.div(torch.tensor(float(nmax)), mx - mn, out=iscales[0])
    mins[0] = mn
    # The trial's levels beside x, so that one product gives both (w*l)*l and (w*l)*x.
    lx = torch.empty(n, 2, blocks)
    lx[:, 1] = x
    lf = lx[:, 0]
    lf = _levels_(torch.mul(x - mn, iscale, out=lf), 0, nmax, exact)
    scale = _rdiv(1.0, iscale)
    e = torch.mul(lf, scale)
    e.add_(mn).sub_(x)
    (e.abs_() if use_mad else e.square_()).mul_(w)
    # What the trials update where they win: best error, scale, min (cur_min, the next start).
    state = torch.empty(3, blocks)
    _SeqSum(e, state[0])()
    state[1] = scale
    state[2] = mn
    cur_min = state[2]
    win = torch.zeros(blocks, dtype=torch.int64)
    sums = torch.empty(n, 3, blocks)
    wl = sums[:, 0]
    wl_terms = sums[:, 1:]
    wl_by = wl.unsqueeze(1)
    # sum_l, sum_l2, sum_xl (the trial's), sum_w, sum_x; the six products D and the two
    # numerators are made of, as pairs to subtract: sum_w*sum_l2 - sum_l*sum_l, ...
    vals = torch.empty(5, blocks)
    vals[3], vals[4] = sum_w, sum_x
    sum_l2, sum_xl = vals[1], vals[2]
    left_rows, right_rows = torch.tensor([3, 0, 3, 4, 1, 0]), torch.tensor([1, 0, 2, 0, 4, 2])
    left, right, prods = torch.empty(6, blocks), torch.empty(6, blocks), torch.empty(6, blocks)
    pairs = prods.view(3, 2, blocks)
    q = torch.empty(3, blocks)  # D, D * this_scale, D * this_min
    d = q[0]
    new = torch.empty(3, blocks)  # the trial's error, this_scale, this_min
    this_scale, this_min = new[1], new[2]
    alt = torch.empty(blocks)
    pos, ok, better = (torch.empty(blocks, dtype=torch.bool) for _ in range(3))
    sum_trial, sum_err = _SeqSum(sums, vals[:3]), _SeqSum(e, new[0])
    for t, (num, iscale, trial_min) in enumerate(zip(nums, iscales.unbind(0)[1:], mins.unbind(0)[1:]), 1):
        torch.div(num, torch.sub(mx, cur_min, out=tmp), out=iscale)
        trial_min.copy_(cur_min)
        _levels_(torch.mul(torch.sub(x, cur_min, out=lf), iscale, out=lf), 0, nmax, exact)
        torch.mul(w, lf, out=wl)
        torch.mul(wl_by, lx, out=wl_terms)
        sum_trial()
        torch.index_select(vals, 0, left_rows, out=left)
        torch.index_select(vals, 0, right_rows, out=right)
        torch.mul(left, right, out=prods)
        torch.sub(pairs[:, 0], pairs[:, 1], out=q)
        torch.div(q[1:], d, out=new[1:])
        torch.gt(this_min, 0.0, out=pos)  # if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
        torch.where(pos, torch.div(sum_xl, sum_l2, out=alt), this_scale, out=this_scale)
        this_min.clamp_(max=0.0)
        torch.mul(lf, this_scale, out=e).add_(this_min).sub_(x)
        (e.abs_() if use_mad else e.square_()).mul_(w)
        sum_err()
        torch.gt(d, 0.0, out=ok)
        ok &= torch.lt(new[0], state[0], out=better)
        torch.where(ok, new, state, out=state)
        win.masked_fill_(ok, t)
    scale = state[1]
    if not exact and bool((_out_of_range(iscales, lo, mx, mins) & ~flat).any()):
        return None
    win = win[None]
    L = torch.sub(x, mins.gather(0, win)).mul_(iscales.gather(0, win))
    L = _levels_(L, 0, nmax, exact)
    scale = torch.where(flat, zero, scale)
    the_min = torch.where(flat, -mn, -cur_min)
    L.masked_fill_(flat, 0.0)
    return scale, the_min, L


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` for blocks as columns: ``x`` (n, blocks).

    Returns (scale, L) with L (n, blocks) as float32 levels in 0..2*nmax-1. The first fit, then
    the tries ``is = -9..9`` one after another on reused buffers, each vectorized across blocks.
    """
    result = _make_qx_quants_rmse1(x, nmax, exact=False) if bool(torch.isfinite(x).all()) else None
    if result is None:
        result = _make_qx_quants_rmse1(x, nmax, exact=True)
    assert result is not None
    return result


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's largest magnitude and the value that has it, found as ggml's loops find them
    (``ax > amax``, in order: the first of equal magnitudes wins), for blocks as columns."""
    amax = torch.zeros(x.shape[1])
    mx = torch.zeros(x.shape[1])
    for xi in x:
        ax = xi.abs()
        gt = ax > amax
        amax = torch.where(gt, ax, amax)
        mx = torch.where(gt, xi, mx)
    return amax, mx


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int,
                          exact: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    n, blocks = x.shape
    amax, mx = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    weights = torch.stack([w * x, w], 1)  # (n, 2, blocks): w*x and w, times l in one product
    f32 = torch.float32
    nums = float(nmax) + torch.tensor(0.1, dtype=f32) * torch.arange(-9, 10, dtype=f32)
    order = [9] + [k for k in range(19) if k != 9]  # is = 0 first: its fit is the start
    iscales = -nums[order, None] / mx  # -(nmax + 0.1f*is) / max
    if not exact and bool((~(iscales.abs() * amax <= 4194303.0) & ~zero).any()):
        return None
    f = torch.empty(n, blocks)
    sums = torch.empty(n, 2, blocks)  # w*x*l, w*l*l
    acc = torch.empty(2, blocks)
    sumlx, suml2 = acc
    sum_trial = _SeqSum(sums, acc)
    f_by = f.unsqueeze(1)
    l2_terms = sums[:, 1]
    state = torch.empty(2, blocks)  # scale, best
    new = torch.empty(2, blocks)
    new_scale = new[0]
    win = torch.zeros(blocks, dtype=torch.int64)
    ok, better = torch.empty(blocks, dtype=torch.bool), torch.empty(blocks, dtype=torch.bool)
    lhs, rhs = torch.empty(blocks), torch.empty(blocks)
    for t, iscale in enumerate(iscales.unbind(0)):
        lf = _levels_(torch.mul(x, iscale, out=f), -nmax, nmax - 1, exact)
        torch.mul(weights, f_by, out=sums)
        l2_terms.mul_(lf)
        sum_trial()
        torch.div(sumlx, suml2, out=new_scale)
        torch.mul(new_scale, sumlx, out=new[1])
        if t == 0:
            state[0] = torch.where(suml2 != 0, new_scale, 0.0)  # suml2 ? sumlx/suml2 : 0
            torch.mul(state[0], sumlx, out=state[1])
            continue
        torch.gt(suml2, 0.0, out=ok)  # suml2 > 0 && sumlx*sumlx > best*suml2
        ok &= torch.gt(torch.mul(sumlx, sumlx, out=lhs), torch.mul(state[1], suml2, out=rhs), out=better)
        torch.where(ok, new, state, out=state)
        win.masked_fill_(ok, t)
    scale = state[0]
    L = _levels_(torch.mul(x, iscales.gather(0, win[None]), out=f), -nmax, nmax - 1, exact).add_(nmax)
    scale = torch.where(zero, torch.zeros(blocks), scale)
    L.masked_fill_(zero, 0.0)
    return scale, L


def _k_scales(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's super-block scales, as ``quantize_row_q4_K_ref`` packs them: (S, 8) each in.

    Returns the 12 packed scale bytes, the fp16 bits of d and dmin, and per block the requantizing
    ``d`` and ``dm`` that ``get_scale_min_k4`` and ``GGML_FP16_TO_FP32`` give back.
    """
    zero = torch.zeros(scales.shape[0])
    max_scale, _ = _first_max(scales.T, zero)
    max_min, _ = _first_max(mins.T, zero)
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), zero)
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)  # (uint8_t), then MIN(63, .)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    packed = torch.empty(scales.shape[0], 12, dtype=torch.int32)
    packed[:, 0:4] = ls[:, 0:4] | (ls[:, 4:8] >> 4) << 6
    packed[:, 4:8] = lm[:, 0:4] | (lm[:, 4:8] >> 4) << 6
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | (lm[:, 4:8] & 0xF) << 4
    d_bits = _f16_bits(max_scale / 63.0)
    dmin_bits = _f16_bits(max_min / 63.0)
    d = _f16_value(d_bits)[:, None] * ls.to(torch.float32)
    dm = _f16_value(dmin_bits)[:, None] * lm.to(torch.float32)
    return packed, d_bits, dmin_bits, d, dm


def _qkx_superblocks(x: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part Q4_K and Q5_K share: per 32 values ``make_qkx2_quants`` with weights
    ``av_x + |x|``, the packed scales, and every value requantized with the stored scales."""
    s = x.shape[0]
    blocks = x.reshape(s * 8, 32).T.contiguous()  # (32, S*8): positions first
    sum_x2 = _SeqSum(blocks * blocks, torch.empty(s * 8))()
    av_x = _sqrt(sum_x2 / 32.0)
    w = av_x + blocks.abs()
    scales, mins, L = make_qkx2_quants(blocks, w, nmax, rmin, rdelta, nstep)
    packed, d_bits, dmin_bits, d, dm = _k_scales(scales.reshape(s, 8), mins.reshape(s, 8))
    xb = x.reshape(s, 8, 32)
    lq = nearest_int((xb + dm[..., None]) / d[..., None]).clamp_(0, nmax)
    L = torch.where((d != 0)[..., None], lq, L.T.reshape(s, 8, 32).to(torch.int32))
    return L.reshape(s, QK_K), packed, d_bits, dmin_bits


def _fp16_bytes(bits: torch.Tensor) -> torch.Tensor:
    return torch.stack([bits & 0xFF, bits >> 8 & 0xFF], 1)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q4_K_ref`` for super-blocks ``x`` (S, 256): block_q4_K bytes (S, 144)."""
    L, packed, d_bits, dmin_bits = _qkx_superblocks(x, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | L[:, :, 1] << 4).reshape(-1, 128)
    return torch.cat([_fp16_bytes(d_bits), _fp16_bytes(dmin_bits), packed, qs], 1).to(torch.uint8)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q5_K_ref`` for super-blocks ``x`` (S, 256): block_q5_K bytes (S, 176)."""
    L, packed, d_bits, dmin_bits = _qkx_superblocks(x, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    low = L & 0xF
    qs = (low[:, :, 0] | low[:, :, 1] << 4).reshape(-1, 128)
    high = L >> 4  # (S, 4, 2, 32): bit 2*k of qh[j] for L[64k + j], bit 2*k + 1 for L[64k + 32 + j]
    shifts = torch.arange(8, dtype=torch.int32).reshape(1, 4, 2, 1)
    qh = (high << shifts).sum((1, 2), dtype=torch.int32)
    return torch.cat([_fp16_bytes(d_bits), _fp16_bytes(dmin_bits), packed, qh, qs], 1).to(torch.uint8)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q6_K_ref`` for super-blocks ``x`` (S, 256): block_q6_K bytes (S, 210)."""
    s = x.shape[0]
    blocks = x.reshape(s * 16, 16).T.contiguous()
    scales, L = make_qx_quants_rmse1(blocks, 32)
    scales = scales.reshape(s, 16)
    L = L.T.reshape(s, 16, 16).to(torch.int32)
    max_abs, index = _first_max(scales.abs().T, torch.zeros(s))
    max_scale = scales.gather(1, index.clamp(min=0)[:, None])[:, 0]
    zero = max_abs < GROUP_MAX_EPS
    iscale = _rdiv(-128.0, max_scale)
    d_bits = _f16_bits(_rdiv(1.0, iscale))
    sc = nearest_int(iscale[:, None] * scales).clamp_(max=127)
    sc = (sc & 0xFF) - ((sc & 0x80) << 1)  # (int8_t)
    d = _f16_value(d_bits)[:, None] * sc.to(torch.float32)
    lq = nearest_int(x.reshape(s, 16, 16) / d[..., None]).clamp_(-32, 31) + 32
    L = torch.where((d != 0)[..., None], lq, L).reshape(s, 2, 4, 32)
    low = L & 0xF
    ql = torch.cat([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], 2).reshape(s, 128)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    qh = ((L >> 4) << shifts).sum(2, dtype=torch.int32).reshape(s, 64)
    out = torch.cat([ql, qh, sc & 0xFF, _fp16_bytes(d_bits)], 1)
    out[zero] = 0
    return out.to(torch.uint8)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for blocks as columns: ``x`` (n, blocks).

    Returns (scale, L) with L (n, blocks) int32 in 0..2*nmax-1. The refinement visits the values
    one after another, each step vectorized across blocks. C stops a block's passes once one
    changes nothing; a pass after that would change nothing either, so all blocks make all five.
    """
    n, blocks = x.shape
    amax, mx = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    iscale = _rdiv(-float(nmax), mx)
    L = nearest_int(x * iscale).clamp_(-nmax, nmax - 1).to(torch.float32)
    w = x * x
    wx = w * x
    sumlx = torch.zeros(blocks)
    suml2 = torch.zeros(blocks)
    for i in range(n):
        sumlx = sumlx + wx[i] * L[i]
        suml2 = suml2 + w[i] * L[i] * L[i]
    for _ in range(5):
        for i in range(n):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(torch.float32)
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w[i] * new_l * new_l
            ok = ((sumlx - wx[i] * li > 0) & (new_l != li) & (sl2 > 0)
                  & (slx * slx * suml2 > sumlx * sumlx * sl2))
            L[i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros(blocks))
    scale = torch.where(zero, torch.zeros(blocks), scale)
    L = torch.where(zero[None], 0, L.to(torch.int32) + nmax)
    return scale, L


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """``qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6`` of (S, 256): (S, 64)."""
    L = L.reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 1, 4, 1)
    return (L << shifts).sum(2, dtype=torch.int32).reshape(-1, 64)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q2_K_ref`` for super-blocks ``x`` (S, 256): block_q2_K bytes (S, 84)."""
    s = x.shape[0]
    blocks = x.reshape(s * 16, 16).T.contiguous()
    scales, mins, L = make_qkx2_quants(blocks, blocks.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(s, 16), mins.reshape(s, 16)
    zero = torch.zeros(s)
    max_scale, _ = _first_max(scales.T, zero)
    max_min, _ = _first_max(mins.T, zero)
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = torch.where(has_scale[:, None], nearest_int(_rdiv(15.0, max_scale)[:, None] * scales), 0)
    lm = nearest_int(_rdiv(15.0, max_min)[:, None] * mins)
    sc = torch.where(has_min[:, None], ls | lm << 4, ls) & 0xFF
    d_bits = torch.where(has_scale, _f16_bits(max_scale / 15.0), 0)
    dmin_bits = torch.where(has_min, _f16_bits(max_min / 15.0), 0)
    d = _f16_value(d_bits)[:, None] * (sc & 0xF).to(torch.float32)
    dm = _f16_value(dmin_bits)[:, None] * (sc >> 4).to(torch.float32)
    xb = x.reshape(s, 16, 16)
    lq = nearest_int((xb + dm[..., None]) / d[..., None]).clamp_(0, 3)
    L = torch.where((d != 0)[..., None], lq, L.T.reshape(s, 16, 16).to(torch.int32))
    return torch.cat([sc, _pack_2bit(L), _fp16_bytes(d_bits), _fp16_bytes(dmin_bits)], 1).to(torch.uint8)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q3_K_ref`` for super-blocks ``x`` (S, 256): block_q3_K bytes (S, 110)."""
    s = x.shape[0]
    blocks = x.reshape(s * 16, 16).T.contiguous()
    scales, L = make_q3_quants(blocks, 4)
    scales = scales.reshape(s, 16)
    max_abs, index = _first_max(scales.abs().T, torch.zeros(s))
    max_scale = torch.where(index >= 0, scales.gather(1, index.clamp(min=0)[:, None])[:, 0], 0.0)
    has = max_scale != 0
    iscale = _rdiv(-32.0, max_scale)
    l8 = nearest_int(iscale[:, None] * scales) & 0xFF
    l8 = l8 - ((l8 & 0x80) << 1)  # (int8_t)
    l6 = torch.where(has[:, None], l8.clamp_(-32, 31) + 32, 0)  # what the 12 bytes hold
    packed = torch.zeros(s, 12, dtype=torch.int32)
    packed[:, 0:8] = l6[:, 0:8] & 0xF | (l6[:, 8:16] & 0xF) << 4
    high = (l6 >> 4).reshape(s, 4, 4)  # [j // 4, j % 4]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32).reshape(1, 4, 1)
    packed[:, 8:12] = (high << shifts).sum(1, dtype=torch.int32)
    d_bits = torch.where(has, _f16_bits(_rdiv(1.0, iscale)), 0)
    d = _f16_value(d_bits)[:, None] * (l6 - 32).to(torch.float32)
    lq = nearest_int(x.reshape(s, 16, 16) / d[..., None]).clamp_(-4, 3) + 4
    L = torch.where((d != 0)[..., None], lq, L.T.reshape(s, 16, 16)).reshape(s, 8, 32)
    hbits = (L > 3).to(torch.int32)  # value j: bit j // 32 of hmask[j % 32]
    hmask = (hbits << torch.arange(8, dtype=torch.int32).reshape(1, 8, 1)).sum(1, dtype=torch.int32)
    L = L - 4 * hbits
    return torch.cat([hmask, _pack_2bit(L.reshape(s, 256)), packed, _fp16_bytes(d_bits)], 1).to(torch.uint8)


_K_QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}


def quantize_rows(rows: torch.Tensor, qtype: int) -> torch.Tensor:
    """Rows (n, width) of float32 as llama-quantize writes them in ``qtype``: uint8 (n, bytes per row).

    ``width`` must be a multiple of the type's block size. Q2_K to Q6_K are ported from ggml
    (compiled with numba where it imports, ``kquants_backend``; the torch port otherwise);
    Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are gguf-py's quantizers, as the converter's.
    The torch port works ``_CHUNK_SUPERBLOCKS`` super-blocks (2^18 values) at a time, so memory stays
    bounded whatever the rows; give about that many values per call, as each of the ~2000 torch
    ops of a chunk costs microseconds however few blocks it covers (4 rows of 4096 quantize at a
    third of the speed of 64).
    """
    require_gguf()
    qtype = gguf.GGMLQuantizationType(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if rows.dim() != 2 or rows.dtype != torch.float32 or rows.shape[1] % block:
        raise ValueError(f"{qtype.name} quantizes float32 rows of a multiple of {block} values, "
                         f"not {rows.dtype} {list(rows.shape)}")
    n, width = rows.shape
    row_bytes = width // block * type_size
    quantizer = _K_QUANTIZERS.get(qtype.name)
    if quantizer is None:
        with np.errstate(over="ignore", invalid="ignore"):  # inf where a scale is beyond f16, as in C
            data = gguf.quants.quantize(rows.contiguous().numpy(), qtype)
        return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(n, row_bytes))
    out = torch.empty(n, row_bytes, dtype=torch.uint8)
    flat_in = rows.contiguous().reshape(-1, QK_K)
    flat_out = out.reshape(-1, type_size)
    compiled = _compiled_kquants()
    if compiled is not None:
        compiled(flat_in.numpy(), flat_out.numpy(), qtype.name)
        return out
    with one_torch_thread():  # _seq_sum's order holds on one thread
        for a in range(0, flat_in.shape[0], _CHUNK_SUPERBLOCKS):
            b = min(a + _CHUNK_SUPERBLOCKS, flat_in.shape[0])
            flat_out[a:b] = quantizer(_padded(flat_in[a:b]))[: b - a]
    return out


def kquants_backend() -> str:
    """Which k-quant code ``quantize_rows`` runs: ``numba`` when numba imports, else ``torch``.

    ``DELTAMERGE_KQUANTS=torch`` forces the torch port (tests compare the two; debugging), and
    ``DELTAMERGE_KQUANTS=numba`` refuses to fall back, so a missing numba fails loudly.
    """
    wanted = os.environ.get(KQUANTS_ENV, "")
    if wanted not in ("", "numba", "torch"):
        raise ValueError(f"{KQUANTS_ENV}={wanted!r}: expected 'numba' or 'torch'")
    if wanted == "torch":
        return "torch"
    if wanted == "numba" or _numba_quantize() is not None:
        return "numba"
    return "torch"


def _compiled_kquants() -> Callable[[np.ndarray, np.ndarray, str], None] | None:
    if kquants_backend() == "torch":
        return None
    quantize = _numba_quantize()
    if quantize is None:
        raise ImportError(f"{KQUANTS_ENV}=numba, but numba does not import: pip install numba")
    return quantize


def _numba_quantize() -> Callable[[np.ndarray, np.ndarray, str], None] | None:
    """``gguf_kquants_numba.quantize`` where numba is installed, its module imported on first use
    (a seam the tests replace to act as if numba were not installed)."""
    return load(f"{_NUMBA_KERNELS}:quantize") if _HAS_NUMBA else None


def _padded(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks ``x`` and zero ones after them, to a multiple of 8: a multiple of
    ``_SUM_COLUMNS`` blocks of 32 (or 16) values, so every sum takes ``_seq_sum``'s fast path."""
    short = -x.shape[0] % 8
    return torch.cat([x, x.new_zeros(short, QK_K)]) if short else x
