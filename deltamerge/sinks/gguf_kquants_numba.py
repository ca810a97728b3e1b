"""llama.cpp's k-quant row quantizers compiled with numba: the C ``_ref`` code, statement by statement.

``gguf_quants`` ports ``quantize_row_q2_K_ref`` ... ``quantize_row_q6_K_ref`` to torch,
vectorized across super-blocks; each trial of the scale searches is then a dozen passes over
memory: on one thread 2-2.5x the C code's time for Q2_K, Q4_K to Q6_K, 10x for Q3_K (whose
refinement goes value by value). Here the C loops are kept as they are (scalar float32
arithmetic) and numba compiles them. ``gguf_quants.quantize_rows`` uses them when numba imports,
and the torch port otherwise, or when the environment variable ``DELTAMERGE_KQUANTS=torch`` asks
for it.

Lanes. The scale searches of every k-type (``make_qkx2_quants``, ``make_qx_quants``,
``make_q3_quants``) run on 64 independent sub-blocks at once (``LANES``): every lane does its
sub-block's C operations in the C order, one float32 operation for one, with the lane as the
innermost loop, so LLVM packs 8 lanes into each AVX operation and changes none of them. The C
code's branches become per-lane selects (a lane it returns early from is computed anyway, then
given the early return's values). The final levels go the same way, 256 values in one loop.
Q3_K's refinement keeps its order within a lane (level after level, each seeing the sums the last
one left) and stops a lane where the C loop breaks. On one thread, 64 rows of 4096 normal values:
3-5x the scalar code's speed, 2.5-4x the C code's (docs/performance.md has the figures).

Packed operations give the bytes of scalar ones except in one thing: which NaN an add or a multiply
returns when both operands are NaN (x86 returns the first operand's, and LLVM may swap the
operands of a commutative operation, as gcc does not here). On a super-block whose values are all
finite and at most ``TAME`` (65536) in magnitude, every NaN a search makes comes from operands
that are not NaN (the one default NaN), and none is ever kept as a scale, min, sum or level (a
trial is kept only where its error, or its sums, are finite and compare true): such super-blocks
take the lanes; the rest (NaN, infinities, huge values) take the scalar code, whose NaNs travel
as the C code's.

What keeps the bytes the C code's (ggml-quants.c built for x86-64: no fused multiply-add, no
reassociation):

- ``fastmath=False``: LLVM then neither contracts ``a*b + c`` into an FMA nor reorders a sum.
- float32 stays float32: numba widens ``float32 op int`` and ``float32 op float64`` to float64,
  so every int the C code converts implicitly is converted here with ``np.float32(...)``, and its
  ``1.f``-style literals are ``np.float32`` constants. ``nearest_int`` accepts float32 only (its
  bit cast refuses anything else when compiling), so no widened value reaches it unnoticed.
- ``nearest_int`` is C's: ``fval + 12582912.f`` read back as bits, so NaN, infinities and values
  beyond its range give the C code's integers (``_level`` is the same bits with the clamp, in
  int32); no float is converted to an int (LLVM's ``fptosi`` of an out-of-range value is poison)
  but the lanes' levels, which are ``_level``'s small integers held as float32. ``(uint8_t)`` and
  ``(int8_t)`` wraps are masks.
- fp16 scales go through ``ggml_compute_fp32_to_fp16``/``ggml_compute_fp16_to_fp32`` mirrored on
  the bits (round to nearest even, NaN as 0x7E00 with its sign), as ``GGML_FP32_TO_FP16`` is in
  that build.

``nogil=True``: the run's ``ComputePool`` threads quantize rows side by side; each call works on
its own super-blocks and buffers, so the bytes do not depend on the thread count. ``cache=True``:
the first call of each type compiles it (7-12 s of CPU: the lanes' loops are long) and numba
keeps the machine code in ``__pycache__`` (or a user cache folder where that is read-only) for
later processes.
"""

# The C code's names are kept, its ``l`` (a level) included, so each line reads beside its C line.
# ruff: noqa: E741

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["KERNELS", "quantize"]

_JIT = {"fastmath": False, "nogil": True, "cache": True, "error_model": "numpy"}
F32 = np.float32
QK_K = 256


@intrinsic
def _f32_bits(typingctx, f):
    """A float32's bits as C's ``memcpy``/union reads them, as an unsigned 32-bit value in an int64."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bits are the low 32 of ``bits`` (``fp32_from_bits``)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        wide = context.cast(builder, args[0], signature.args[0], types.int64)
        return builder.bitcast(builder.trunc(wide, ir.IntType(32)), ir.FloatType())

    return types.float32(bits), codegen


@njit(**_JIT)
def nearest_int(fval):
    """ggml's ``nearest_int``: ``fval + 12582912.f`` read as an int, low 23 bits less 2^22."""
    val = fval + F32(12582912.0)
    return (_f32_bits(val) & 0x007FFFFF) - 0x00400000


@njit(**_JIT)
def fp32_to_fp16(f):
    """ggml's ``ggml_compute_fp32_to_fp16`` (``GGML_FP32_TO_FP16``): the half's bits."""
    scale_to_inf = _f32_from_bits(0x77800000)  # 0x1.0p+112f
    scale_to_zero = _f32_from_bits(0x08800000)  # 0x1.0p-110f
    base = (abs(f) * scale_to_inf) * scale_to_zero
    w = _f32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _f32_from_bits((bias >> 1) + 0x07800000) + base
    bits = _f32_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return ((sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)) & 0xFFFF


@njit(**_JIT)
def fp16_to_fp32(h):
    """ggml's ``ggml_compute_fp16_to_fp32`` (``GGML_FP16_TO_FP32``) of the half's bits."""
    w = (h << 16) & 0xFFFFFFFF
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    exp_offset = 0xE0 << 23
    exp_scale = _f32_from_bits(0x07800000)  # 0x1.0p-112f
    normalized_value = _f32_from_bits((two_w >> 4) + exp_offset) * exp_scale
    magic_mask = 126 << 23
    magic_bias = F32(0.5)
    denormalized_value = _f32_from_bits((two_w >> 17) | magic_mask) - magic_bias
    denormalized_cutoff = 1 << 27
    if two_w < denormalized_cutoff:
        result = sign | _f32_bits(denormalized_value)
    else:
        result = sign | _f32_bits(normalized_value)
    return _f32_from_bits(result)


@njit(**_JIT)
def _put_fp16(y, at, bits):
    """A ``ggml_fp16_t`` field at byte ``at``, little-endian."""
    y[at] = bits & 0xFF
    y[at + 1] = bits >> 8


@njit(inline="always", **_JIT)
def _first_pass(n, nmax, x, L, offset):
    """The opening of ggml's ``make_qx_quants`` and ``make_q3_quants`` (the same lines in both):
    ``mx``, the value of largest magnitude (the first on ties), then ``L`` at the scale ``-nmax / mx``
    (plus ``offset``) and that scale's sums ``sumlx``, ``suml2``; ``mx`` 0 and ``L`` all 0 where
    every value is below ``GROUP_MAX_EPS``."""
    mx = F32(0)
    amax = F32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    sumlx = F32(0)
    suml2 = F32(0)
    if amax < F32(1e-15):  # GROUP_MAX_EPS
        for i in range(n):
            L[i] = 0
        return F32(0), sumlx, suml2
    iscale = F32(-nmax) / mx
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + offset
        w = x[i] * x[i]
        fl = F32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    return mx, sumlx, suml2


@njit(inline="always", **_JIT)  # into its caller, as gcc does: 1.2x on Q6_K
def make_qx_quants_rmse1(n, nmax, x, L):
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``: the scale; ``L`` (int8) in
    0..2*nmax-1."""
    mx, sumlx, suml2 = _first_pass(n, nmax, x, L, nmax)
    if mx == F32(0):
        return F32(0)
    scale = sumlx / suml2 if suml2 != 0 else F32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx = F32(0)
        suml2 = F32(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = x[i] * x[i]
            fl = F32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(inline="always", **_JIT)  # into its caller, as gcc does: 1.2x on Q6_K
def make_q3_quants(n, nmax, x, L):
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)``: the scale; ``L`` (int8) in 0..2*nmax-1."""
    mx, sumlx, suml2 = _first_pass(n, nmax, x, L, 0)
    if mx == F32(0):
        return F32(0)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = F32(L[i])
            slx = sumlx - w * x[i] * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fn = F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > F32(0) else F32(0)


@njit(**_JIT)
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml's ``make_qkx2_quants``: (scale, the_min); ``L`` (uint8) in 0..nmax."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F32(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F32(0), -mn
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    best_error = F32(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * F32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (mx - mn)
        sum_l = F32(0)
        sum_l2 = F32(0)
        sum_xl = F32(0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F32(0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@intrinsic
def _level(typingctx, fval, lo, hi):
    """``MAX(lo, MIN(hi, nearest_int(fval)))`` as an int32: the C code's int arithmetic kept in 32
    bits (its ``int``), so that LLVM packs it across lanes with the floats around it."""
    if fval != types.float32 or not isinstance(lo, types.Integer) or not isinstance(hi, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        val = builder.fadd(args[0], ir.Constant(ir.FloatType(), 12582912.0))
        l = builder.sub(builder.and_(builder.bitcast(val, i32), ir.Constant(i32, 0x007FFFFF)),
                        ir.Constant(i32, 0x00400000))
        lo32 = builder.trunc(context.cast(builder, args[1], signature.args[1], types.int64), i32)
        hi32 = builder.trunc(context.cast(builder, args[2], signature.args[2], types.int64), i32)
        l = builder.select(builder.icmp_signed("<", hi32, l), hi32, l)
        return builder.select(builder.icmp_signed(">", lo32, l), lo32, l)

    return types.int32(fval, lo, hi), codegen


@intrinsic
def _div(typingctx, a, b):
    """``a / b`` in float32 as C divides: one ``fdiv``, without the zero test numba puts before its
    division, whose branch keeps LLVM from packing a loop across lanes."""
    if a != types.float32 or b != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(args[0], args[1])

    return types.float32(a, b), codegen


# The scale searches run on LANES sub-blocks at once (8 super-blocks of Q4_K/Q5_K, 4 of the others):
# each lane does its C code's float32 operations in their order, with the lane the innermost loop, so
# LLVM packs 8 lanes into each AVX operation without changing any of them. Data-dependent branches
# become per-lane selects; a lane the C code returns early from is computed anyway and its result
# replaced by the early return's. Everything lives in one float32 buffer at constant offsets: LLVM
# then knows the regions apart (with separate arrays it gives up), and LANES must be a constant
# (numba leaves SLP vectorizing off, and a loop of 8 is unrolled whole before the loop vectorizer).
LANES = 64
TAME = F32(65536)
# The per-lane rows after the values: levels and trial levels are float32 (exact small integers).
(_MN, _MX, _SW, _SX, _ISC, _BEST, _SL, _SL2, _SXL, _TS, _TM, _CUR, _TAKE, _SCALE, _EXIT) = range(15)
_NROWS = 15


@njit(inline="always", **_JIT)
def _qkx2_lanes(n, nmax, b, rmin, rdelta, nstep, use_mad):
    """ggml's ``make_qkx2_quants`` on LANES sub-blocks of ``n`` values: ``b`` holds the values at
    ``[i * LANES + k]`` (value i of lane k), then the weights, the levels, the trial levels and the
    rows above (``_lanes_size``). Leaves the scale in row ``_SCALE``, ``-the_min`` in row ``_MN``
    negated (``the_min`` is ``-b[_MN]``), the levels (0..nmax) in the levels region."""
    X = 0
    W = n * LANES
    LV = 2 * n * LANES
    AUX = 3 * n * LANES
    S = 4 * n * LANES
    for k in range(LANES):
        b[S + _MN * LANES + k] = b[X + k]
        b[S + _MX * LANES + k] = b[X + k]
        b[S + _SW * LANES + k] = b[W + k]
        b[S + _SX * LANES + k] = b[W + k] * b[X + k]
    for i in range(1, n):
        for k in range(LANES):
            v = b[X + i * LANES + k]
            m = b[S + _MN * LANES + k]
            b[S + _MN * LANES + k] = v if v < m else m
            m = b[S + _MX * LANES + k]
            b[S + _MX * LANES + k] = v if v > m else m
            w = b[W + i * LANES + k]
            b[S + _SW * LANES + k] += w
            b[S + _SX * LANES + k] += w * v
    for k in range(LANES):
        mn = b[S + _MN * LANES + k]
        mn = F32(0) if mn > 0 else mn
        b[S + _MN * LANES + k] = mn
        b[S + _EXIT * LANES + k] = F32(1) if b[S + _MX * LANES + k] == mn else F32(0)
        iscale = _div(F32(nmax), b[S + _MX * LANES + k] - mn)
        b[S + _ISC * LANES + k] = iscale
        b[S + _SCALE * LANES + k] = _div(F32(1), iscale)
        b[S + _BEST * LANES + k] = F32(0)
    for i in range(n):
        for k in range(LANES):
            xv = b[X + i * LANES + k]
            mn = b[S + _MN * LANES + k]
            fl = F32(_level(b[S + _ISC * LANES + k] * (xv - mn), 0, nmax))
            b[LV + i * LANES + k] = fl
            diff = b[S + _SCALE * LANES + k] * fl + mn - xv
            diff = abs(diff) if use_mad else diff * diff
            b[S + _BEST * LANES + k] += b[W + i * LANES + k] * diff
    for step in range(nstep + 1):
        for k in range(LANES):
            b[S + _ISC * LANES + k] = _div(rmin + rdelta * F32(step) + F32(nmax),
                                           b[S + _MX * LANES + k] - b[S + _MN * LANES + k])
            b[S + _SL * LANES + k] = F32(0)
            b[S + _SL2 * LANES + k] = F32(0)
            b[S + _SXL * LANES + k] = F32(0)
        for i in range(n):
            for k in range(LANES):
                xv = b[X + i * LANES + k]
                fl = F32(_level(b[S + _ISC * LANES + k] * (xv - b[S + _MN * LANES + k]), 0, nmax))
                b[AUX + i * LANES + k] = fl
                w = b[W + i * LANES + k]
                b[S + _SL * LANES + k] += w * fl
                b[S + _SL2 * LANES + k] += w * fl * fl
                b[S + _SXL * LANES + k] += w * fl * xv
        for k in range(LANES):
            sum_w = b[S + _SW * LANES + k]
            sum_x = b[S + _SX * LANES + k]
            sum_l = b[S + _SL * LANES + k]
            sum_l2 = b[S + _SL2 * LANES + k]
            sum_xl = b[S + _SXL * LANES + k]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
            this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
            clamp = this_min > 0
            no_min_scale = _div(sum_xl, sum_l2)  # computed in every lane: a branch per lane costs more
            b[S + _TM * LANES + k] = F32(0) if clamp else this_min
            b[S + _TS * LANES + k] = no_min_scale if clamp else this_scale
            b[S + _TAKE * LANES + k] = F32(1) if D > 0 else F32(0)
            b[S + _CUR * LANES + k] = F32(0)
        for i in range(n):
            for k in range(LANES):
                diff = (b[S + _TS * LANES + k] * b[AUX + i * LANES + k] + b[S + _TM * LANES + k]
                        - b[X + i * LANES + k])
                diff = abs(diff) if use_mad else diff * diff
                b[S + _CUR * LANES + k] += b[W + i * LANES + k] * diff
        for k in range(LANES):
            cur = b[S + _CUR * LANES + k]
            best = b[S + _BEST * LANES + k]
            take = (b[S + _TAKE * LANES + k] > 0) & (cur < best)  # D > 0 && cur_error < best_error
            b[S + _TAKE * LANES + k] = F32(1) if take else F32(0)
            b[S + _BEST * LANES + k] = cur if take else best
            b[S + _SCALE * LANES + k] = b[S + _TS * LANES + k] if take else b[S + _SCALE * LANES + k]
            b[S + _MN * LANES + k] = b[S + _TM * LANES + k] if take else b[S + _MN * LANES + k]
        for i in range(n):
            for k in range(LANES):
                lv = b[LV + i * LANES + k]  # TAKE is 1 or 0, the levels small integers: exact
                b[LV + i * LANES + k] = lv + b[S + _TAKE * LANES + k] * (b[AUX + i * LANES + k] - lv)
    for k in range(LANES):
        if b[S + _EXIT * LANES + k] > 0:  # mx == mn: L = 0, return (0, -mn); mx is mn as it was
            b[S + _SCALE * LANES + k] = F32(0)
            b[S + _MN * LANES + k] = b[S + _MX * LANES + k]
            for i in range(n):
                b[LV + i * LANES + k] = F32(0)


@njit(inline="always", **_JIT)
def _first_pass_lanes(n, nmax, b):
    """``_first_pass`` (offset 0) on LANES sub-blocks of ``n`` values at ``b[i * LANES + k]``: ``mx``
    in row ``_MX``, 1 in row ``_EXIT`` where every |x| is below GROUP_MAX_EPS, the levels (as
    float32) after the values, ``sumlx`` and ``suml2`` in rows ``_SL`` and ``_SL2``."""
    X = 0
    LV = n * LANES
    S = 3 * n * LANES
    for k in range(LANES):
        b[S + _MN * LANES + k] = F32(0)  # amax
        b[S + _MX * LANES + k] = F32(0)  # mx
    for i in range(n):
        for k in range(LANES):
            v = b[X + i * LANES + k]
            ax = abs(v)
            bigger = ax > b[S + _MN * LANES + k]
            b[S + _MN * LANES + k] = ax if bigger else b[S + _MN * LANES + k]
            b[S + _MX * LANES + k] = v if bigger else b[S + _MX * LANES + k]
    for k in range(LANES):
        b[S + _EXIT * LANES + k] = F32(1) if b[S + _MN * LANES + k] < F32(1e-15) else F32(0)  # GROUP_MAX_EPS
        b[S + _ISC * LANES + k] = _div(F32(-nmax), b[S + _MX * LANES + k])
    _trial_lanes(n, nmax, b, LV)


@njit(inline="always", **_JIT)
def _trial_lanes(n, nmax, b, into):
    """One trial of ``make_qx_quants``' search on LANES sub-blocks: the levels at the scale in row
    ``_ISC`` (as float32, at ``into``) and their ``sumlx`` and ``suml2`` (rows ``_SL``, ``_SL2``),
    with ``x*x`` as the weights (rmse_type 1)."""
    X = 0
    S = 3 * n * LANES
    for k in range(LANES):
        b[S + _SL * LANES + k] = F32(0)
        b[S + _SL2 * LANES + k] = F32(0)
    for i in range(n):
        for k in range(LANES):
            v = b[X + i * LANES + k]
            fl = F32(_level(b[S + _ISC * LANES + k] * v, -nmax, nmax - 1))
            b[into + i * LANES + k] = fl
            w = v * v
            b[S + _SL * LANES + k] += w * v * fl
            b[S + _SL2 * LANES + k] += w * fl * fl


@njit(inline="always", **_JIT)
def _qx_rmse1_lanes(n, nmax, b):
    """ggml's ``make_qx_quants(n, nmax, x, L, rmin_type=1, qw=NULL)`` on LANES sub-blocks of ``n``
    values at ``b[i * LANES + k]``: leaves the scale in row ``_SCALE`` and the levels less ``nmax``
    (-nmax..nmax-1, ``L`` is them plus nmax) in the levels region (``_lanes_size``, no weights)."""
    LV = n * LANES
    AUX = 2 * n * LANES
    S = 3 * n * LANES
    _first_pass_lanes(n, nmax, b)
    for k in range(LANES):
        sumlx = b[S + _SL * LANES + k]
        suml2 = b[S + _SL2 * LANES + k]
        scale = _div(sumlx, suml2)
        scale = scale if suml2 != F32(0) else F32(0)
        b[S + _SCALE * LANES + k] = scale
        b[S + _BEST * LANES + k] = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        for k in range(LANES):
            b[S + _ISC * LANES + k] = _div(-(F32(nmax) + F32(0.1) * F32(step)), b[S + _MX * LANES + k])
        _trial_lanes(n, nmax, b, AUX)
        for k in range(LANES):
            sumlx = b[S + _SL * LANES + k]
            suml2 = b[S + _SL2 * LANES + k]
            take = (suml2 > F32(0)) & (sumlx * sumlx > b[S + _BEST * LANES + k] * suml2)
            scale = _div(sumlx, suml2)
            b[S + _TAKE * LANES + k] = F32(1) if take else F32(0)
            b[S + _SCALE * LANES + k] = scale if take else b[S + _SCALE * LANES + k]
            b[S + _BEST * LANES + k] = scale * sumlx if take else b[S + _BEST * LANES + k]
        for i in range(n):
            for k in range(LANES):
                lv = b[LV + i * LANES + k]  # TAKE is 1 or 0, the levels small integers: exact
                b[LV + i * LANES + k] = lv + b[S + _TAKE * LANES + k] * (b[AUX + i * LANES + k] - lv)
    for k in range(LANES):
        if b[S + _EXIT * LANES + k] > 0:  # every |x| below GROUP_MAX_EPS: L = 0, scale 0
            b[S + _SCALE * LANES + k] = F32(0)
            for i in range(n):
                b[LV + i * LANES + k] = F32(-nmax)


@njit(inline="always", **_JIT)
def _q3_lanes(n, nmax, b):
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on LANES sub-blocks of ``n`` values at
    ``b[i * LANES + k]``: the scale in row ``_SCALE``, the levels less ``nmax`` after the values.
    A lane goes on refining while its last round changed a level (row ``_TAKE``), as the C loop
    breaks; a level's change is kept where the C code keeps it (row ``_CUR`` counts them)."""
    X = 0
    LV = n * LANES
    S = 3 * n * LANES
    _first_pass_lanes(n, nmax, b)
    for k in range(LANES):
        b[S + _TAKE * LANES + k] = F32(1)
    for _ in range(5):
        for k in range(LANES):
            b[S + _CUR * LANES + k] = F32(0)
        for i in range(n):
            for k in range(LANES):
                v = b[X + i * LANES + k]
                li = b[LV + i * LANES + k]
                sumlx = b[S + _SL * LANES + k]
                suml2 = b[S + _SL2 * LANES + k]
                w = v * v
                slx_less = sumlx - w * v * li  # slx before and after the new level
                sl2_less = suml2 - w * li * li
                new_l = F32(_level(_div(v * sl2_less, slx_less), -nmax, nmax - 1))
                slx = slx_less + w * v * new_l
                sl2 = sl2_less + w * new_l * new_l
                keep = ((b[S + _TAKE * LANES + k] > 0) & (slx_less > 0) & (new_l != li)
                        & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2))
                one = F32(1) if keep else F32(0)
                b[LV + i * LANES + k] = li + one * (new_l - li)  # small integers: exact
                b[S + _SL * LANES + k] = slx if keep else sumlx
                b[S + _SL2 * LANES + k] = sl2 if keep else suml2
                b[S + _CUR * LANES + k] += one
        going = 0
        for k in range(LANES):
            on = (b[S + _TAKE * LANES + k] > 0) & (b[S + _CUR * LANES + k] > 0)
            b[S + _TAKE * LANES + k] = F32(1) if on else F32(0)
            going += 1 if on else 0
        if going == 0:
            break
    for k in range(LANES):
        sumlx = b[S + _SL * LANES + k]
        suml2 = b[S + _SL2 * LANES + k]
        scale = _div(sumlx, suml2)
        b[S + _SCALE * LANES + k] = scale if suml2 > F32(0) else F32(0)
        if b[S + _EXIT * LANES + k] > 0:  # every |x| below GROUP_MAX_EPS: L = 0, scale 0
            b[S + _SCALE * LANES + k] = F32(0)
            for i in range(n):
                b[LV + i * LANES + k] = F32(-nmax)


@njit(inline="always", **_JIT)
def _lanes_size(n):
    """The float32s a lane search's buffer holds for sub-blocks of ``n`` values: values, weights,
    levels, trial levels, then the per-lane rows."""
    return 4 * n * LANES + _NROWS * LANES


@njit(inline="always", **_JIT)
def _load_lanes(x, i0, n, b):
    """Sub-blocks of ``n`` values of super-blocks ``x[i0:]`` into ``b[i * LANES + k]``, lane ``k``
    sub-block ``k % (QK_K // n)`` of super-block ``i0 + k // (QK_K // n)``; lanes past ``x``'s last
    super-block get zeros (their results are not read)."""
    per = QK_K // n
    for g in range(LANES // per):
        have = i0 + g < x.shape[0]
        for j in range(per):
            for i in range(n):
                b[i * LANES + g * per + j] = x[i0 + g, n * j + i] if have else F32(0)


@njit(**_JIT)
def _pack_2bit(L, y, at):
    """The 2-bit levels' ``qs`` at byte ``at``, as ``quantize_row_q2_K_ref`` and ``q3_K_ref`` pack
    them: ``qs[j/4 + l] = L[j + l] | L[j + l + 32] << 2 | L[j + l + 64] << 4 | L[j + l + 96] << 6``."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            y[at + j // 4 + l] = (np.int64(L[j + l]) | (np.int64(L[j + l + 32]) << 2)
                                  | (np.int64(L[j + l + 64]) << 4) | (np.int64(L[j + l + 96]) << 6))


@njit(**_JIT)
def quantize_row_q2_K(x, y):
    """ggml's ``quantize_row_q2_K_ref``: super-blocks ``x`` (S, 256) float32 into ``y`` (S, 84) uint8.

    block_q2_K: scales[16], qs[64], d, dmin.
    """
    b = np.empty(_lanes_size(16), np.float32)
    L = np.empty(QK_K, np.uint8)
    Laux = np.empty(16, np.uint8)
    weights = np.empty(16, np.float32)
    mins = np.empty(QK_K // 16, np.float32)
    scales = np.empty(QK_K // 16, np.float32)
    q4scale = F32(15)
    S = 4 * 16 * LANES
    for i in range(x.shape[0]):
        g = i % (LANES // 16)
        if g == 0:
            _load_lanes(x, i, 16, b)
            for t in range(16 * LANES):
                b[16 * LANES + t] = abs(b[t])  # weights
            _qkx2_lanes(16, 3, b, F32(-0.5), F32(0.1), 15, True)
        xb = x[i]
        yb = y[i]
        tame = _tame(xb)
        max_scale = F32(0)
        max_min = F32(0)
        for j in range(QK_K // 16):
            if tame:
                k = g * 16 + j
                for l in range(16):
                    L[16 * j + l] = np.int64(b[2 * 16 * LANES + l * LANES + k])
                scales[j] = b[S + _SCALE * LANES + k]
                mins[j] = -b[S + _MN * LANES + k]
            else:
                for l in range(16):
                    weights[l] = abs(xb[16 * j + l])
                scales[j], mins[j] = make_qkx2_quants(16, 3, xb[16 * j:16 * j + 16], weights,
                                                      L[16 * j:16 * j + 16], Laux,
                                                      F32(-0.5), F32(0.1), 15, True)
            scale = scales[j]
            if scale > max_scale:
                max_scale = scale
            mn = mins[j]
            if mn > max_min:
                max_min = mn
        if max_scale > 0:
            iscale = q4scale / max_scale
            for j in range(QK_K // 16):
                yb[j] = nearest_int(iscale * scales[j]) & 0xFF
            d_bits = fp32_to_fp16(max_scale / q4scale)
        else:
            for j in range(QK_K // 16):
                yb[j] = 0
            d_bits = fp32_to_fp16(F32(0))
        if max_min > 0:
            iscale = q4scale / max_min
            for j in range(QK_K // 16):
                l = nearest_int(iscale * mins[j])
                yb[j] = (np.int64(yb[j]) | (l << 4)) & 0xFF
            dmin_bits = fp32_to_fp16(max_min / q4scale)
        else:
            dmin_bits = fp32_to_fp16(F32(0))
        _put_fp16(yb, 80, d_bits)
        _put_fp16(yb, 82, dmin_bits)
        dall = fp16_to_fp32(d_bits)
        dmin = fp16_to_fp32(dmin_bits)
        for j in range(QK_K // 16):
            scales[j] = dall * F32(np.int64(yb[j]) & 0xF)  # d
            mins[j] = dmin * F32(np.int64(yb[j]) >> 4)  # dm
        _levels_with_min(xb, L, scales, mins, 16, 3, tame)
        _pack_2bit(L, yb, 16)


@njit(**_JIT)
def quantize_row_q3_K(x, y):
    """ggml's ``quantize_row_q3_K_ref``: super-blocks ``x`` (S, 256) float32 into ``y`` (S, 110) uint8.

    block_q3_K: hmask[32], qs[64], scales[12], d.
    """
    b = np.empty(_lanes_size(16), np.float32)
    L = np.empty(QK_K, np.int8)
    scales = np.empty(QK_K // 16, np.float32)
    for i in range(x.shape[0]):
        g = i % (LANES // 16)
        if g == 0:
            _load_lanes(x, i, 16, b)
            _q3_lanes(16, 4, b)
        xb = x[i]
        yb = y[i]
        sc12 = yb[96:108]
        tame = _tame(xb)
        max_scale = F32(0)
        amax = F32(0)
        for j in range(QK_K // 16):
            if tame:
                k = g * 16 + j
                for ii in range(16):
                    L[16 * j + ii] = np.int64(b[16 * LANES + ii * LANES + k]) + 4
                scales[j] = b[3 * 16 * LANES + _SCALE * LANES + k]
            else:
                scales[j] = make_q3_quants(16, 4, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
            scale = abs(scales[j])
            if scale > amax:
                amax = scale
                max_scale = scales[j]
        for j in range(12):
            sc12[j] = 0
        if max_scale != 0:
            iscale = F32(-32) / max_scale
            for j in range(QK_K // 16):
                l = nearest_int(iscale * scales[j])
                l = ((l & 0xFF) ^ 0x80) - 0x80  # int8_t l = nearest_int(...)
                l = max(-32, min(31, l)) + 32
                if j < 8:
                    sc12[j] = l & 0xF
                else:
                    sc12[j - 8] = np.int64(sc12[j - 8]) | (l & 0xF) << 4
                l >>= 4
                sc12[j % 4 + 8] = np.int64(sc12[j % 4 + 8]) | l << (2 * (j // 4))
            d_bits = fp32_to_fp16(F32(1) / iscale)
        else:
            d_bits = fp32_to_fp16(F32(0))
        _put_fp16(yb, 108, d_bits)
        dall = fp16_to_fp32(d_bits)
        for j in range(QK_K // 16):
            sc = np.int64(sc12[j]) & 0xF if j < 8 else np.int64(sc12[j - 8]) >> 4
            sc = (sc | (((np.int64(sc12[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            scales[j] = dall * F32(sc)  # d
        for t in range(QK_K):  # one loop of 256 that LLVM packs (a division: its operands stay put)
            d = scales[t // 16]
            l = _level(_div(xb[t], d), -4, 3) + 4
            L[t] = L[t] if d == 0 else l  # sub-blocks whose d is 0 keep their levels
        for j in range(QK_K // 8):
            yb[j] = 0
        for j in range(QK_K):  # the C loop's m and hm are j % 32 and 1 << j // 32; selects, no branch
            high = L[j] > 3
            yb[j % 32] = np.int64(yb[j % 32]) | ((1 << (j // 32)) if high else 0)
            L[j] = L[j] - 4 if high else L[j]
        _pack_2bit(L, yb, 32)


@njit(**_JIT)  # compiled once for Q4_K and Q5_K: each copy costs seconds of compiling
def _qkx_search(x, i0, b, nmax, rmin, rdelta, nstep):
    """The scale searches of ``quantize_row_q4_K_ref``/``q5_K_ref`` for super-blocks ``x[i0:]``,
    LANES // 8 of them (``_load_lanes``): each sub-block's weights ``av_x + |x|`` and its
    ``make_qkx2_quants``."""
    W = 32 * LANES
    SX2 = 4 * 32 * LANES + _SL * LANES  # sum_x2, before the search uses that row
    _load_lanes(x, i0, 32, b)
    for k in range(LANES):
        b[SX2 + k] = F32(0)
    for l in range(32):
        for k in range(LANES):
            b[SX2 + k] += b[l * LANES + k] * b[l * LANES + k]
    for k in range(LANES):
        b[SX2 + k] = np.sqrt(_div(b[SX2 + k], F32(32)))  # av_x
    for l in range(32):
        for k in range(LANES):
            b[W + l * LANES + k] = b[SX2 + k] + abs(b[l * LANES + k])
    _qkx2_lanes(32, nmax, b, rmin, rdelta, nstep, False)


@njit(inline="always", **_JIT)
def _tame(xb):
    """Every value finite and at most TAME in magnitude: the lanes' path is then exact (see LANES)."""
    ok = True
    for v in xb:
        ok &= abs(v) <= TAME
    return ok


@njit(**_JIT)
def _qkx_superblock(xb, yb, b, g, L, Laux, weights, scales, mins, nmax, rmin, rdelta, nstep):
    """What ``quantize_row_q4_K_ref`` and ``quantize_row_q5_K_ref`` share, for one super-block,
    super-block ``g`` of the searches in ``b`` (``_qkx_search``), or searched here, scalar, where it
    is not ``_tame``: d, dmin and the 12 scale bytes written at bytes 0..15, the levels left in ``L``."""
    tame = _tame(xb)
    if tame:
        S = 4 * 32 * LANES
        for j in range(QK_K // 32):
            k = g * 8 + j
            for l in range(32):
                L[32 * j + l] = np.int64(b[2 * 32 * LANES + l * LANES + k])
            scales[j] = b[S + _SCALE * LANES + k]
            mins[j] = -b[S + _MN * LANES + k]
    else:
        for j in range(QK_K // 32):
            sum_x2 = F32(0)
            for l in range(32):
                sum_x2 += xb[32 * j + l] * xb[32 * j + l]
            av_x = np.sqrt(sum_x2 / F32(32))
            for l in range(32):
                weights[l] = av_x + abs(xb[32 * j + l])
            scales[j], mins[j] = make_qkx2_quants(32, nmax, xb[32 * j:32 * j + 32], weights,
                                                  L[32 * j:32 * j + 32], Laux, rmin, rdelta, nstep, False)
    max_scale = F32(0)
    max_min = F32(0)
    for j in range(QK_K // 32):
        scale = scales[j]
        if scale > max_scale:
            max_scale = scale
        mn = mins[j]
        if mn > max_min:
            max_min = mn
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    sc = yb[4:16]
    for j in range(QK_K // 32):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # uint8_t ls = ...; MIN(63, ls)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] = np.int64(sc[j - 4]) | (ls >> 4) << 6
            sc[j - 0] = np.int64(sc[j - 0]) | (lm >> 4) << 6
    d_bits = fp32_to_fp16(max_scale / F32(63))
    dmin_bits = fp32_to_fp16(max_min / F32(63))
    _put_fp16(yb, 0, d_bits)
    _put_fp16(yb, 2, dmin_bits)
    dall = fp16_to_fp32(d_bits)
    dmin = fp16_to_fp32(dmin_bits)
    for j in range(QK_K // 32):
        if j < 4:  # get_scale_min_k4
            s = np.int64(sc[j]) & 63
            m = np.int64(sc[j + 4]) & 63
        else:
            s = (np.int64(sc[j + 4]) & 0xF) | ((np.int64(sc[j - 4]) >> 6) << 4)
            m = (np.int64(sc[j + 4]) >> 4) | ((np.int64(sc[j - 0]) >> 6) << 4)
        scales[j] = dall * F32(s)  # d
        mins[j] = dmin * F32(m)  # dm
    _levels_with_min(xb, L, scales, mins, 32, nmax, tame)


@njit(inline="always", **_JIT)
def _levels_with_min(xb, L, scales, mins, sub, nmax, tame):
    """The last pass Q2_K, Q4_K and Q5_K share: each value's level ``nearest_int((x + dm) / d)``
    in 0..nmax, from its sub-block's (of ``sub`` values) ``d`` in ``scales`` and ``dm`` in
    ``mins``; a sub-block whose d is 0 keeps its levels. A tame super-block goes in one loop of
    256 that LLVM packs (where its adds meet two NaNs, it may swap them: hence tame only)."""
    if tame:
        for t in range(QK_K):
            d = scales[t // sub]
            l = _level(_div(xb[t] + mins[t // sub], d), 0, nmax)
            L[t] = L[t] if d == 0 else l
        return
    for j in range(QK_K // sub):
        d = scales[j]
        if d == 0:
            continue
        dm = mins[j]
        for ii in range(sub):
            l = nearest_int((xb[sub * j + ii] + dm) / d)
            L[sub * j + ii] = max(0, min(nmax, l))


@njit(inline="always", **_JIT)
def _qkx_scratch():
    """The buffers Q4_K's and Q5_K's loops reuse (the lanes' buffer and the C code's locals):
    ``b``, ``L``, ``Laux``, ``weights``, ``scales``, ``mins``."""
    return (np.empty(_lanes_size(32), np.float32), np.empty(QK_K, np.uint8), np.empty(32, np.uint8),
            np.empty(32, np.float32), np.empty(QK_K // 32, np.float32), np.empty(QK_K // 32, np.float32))


@njit(**_JIT)
def quantize_row_q4_K(x, y):
    """ggml's ``quantize_row_q4_K_ref``: super-blocks ``x`` (S, 256) float32 into ``y`` (S, 144) uint8.

    block_q4_K: d, dmin, scales[12], qs[128].
    """
    b, L, Laux, weights, scales, mins = _qkx_scratch()
    for i in range(x.shape[0]):
        g = i % (LANES // 8)
        if g == 0:
            _qkx_search(x, i, b, 15, F32(-1), F32(0.1), 20)
        yb = y[i]
        _qkx_superblock(x[i], yb, b, g, L, Laux, weights, scales, mins, 15, F32(-1), F32(0.1), 20)
        q = 16
        for j in range(0, QK_K, 64):
            for l in range(32):
                yb[q + l] = np.int64(L[j + l]) | (np.int64(L[j + l + 32]) << 4)
            q += 32


@njit(**_JIT)
def quantize_row_q5_K(x, y):
    """ggml's ``quantize_row_q5_K_ref``: super-blocks ``x`` (S, 256) float32 into ``y`` (S, 176) uint8.

    block_q5_K: d, dmin, scales[12], qh[32], qs[128].
    """
    b, L, Laux, weights, scales, mins = _qkx_scratch()
    for i in range(x.shape[0]):
        g = i % (LANES // 8)
        if g == 0:
            _qkx_search(x, i, b, 31, F32(-0.5), F32(0.1), 15)
        yb = y[i]
        _qkx_superblock(x[i], yb, b, g, L, Laux, weights, scales, mins, 31, F32(-0.5), F32(0.1), 15)
        qh = yb[16:48]
        ql = 48
        for j in range(QK_K // 8):
            qh[j] = 0
        m1 = 1
        m2 = 2
        for n in range(0, QK_K, 64):
            for j in range(32):
                l1 = np.int64(L[n + j])  # l1 > 15: l1 - 16 and m1 in qh, as selects, no branch
                l2 = np.int64(L[n + j + 32])
                qh[j] = np.int64(qh[j]) | (m1 if l1 > 15 else 0) | (m2 if l2 > 15 else 0)
                yb[ql + j] = (l1 & 15) | ((l2 & 15) << 4)
            m1 <<= 2
            m2 <<= 2
            ql += 32


@njit(**_JIT)
def quantize_row_q6_K(x, y):
    """ggml's ``quantize_row_q6_K_ref``: super-blocks ``x`` (S, 256) float32 into ``y`` (S, 210) uint8.

    block_q6_K: ql[128], qh[64], scales[16] (int8), d.
    """
    b = np.empty(_lanes_size(16), np.float32)
    L = np.empty(QK_K, np.int8)
    scales = np.empty(QK_K // 16, np.float32)
    sc = np.empty(QK_K // 16, np.int64)
    for i in range(x.shape[0]):
        g = i % (LANES // 16)
        if g == 0:
            _load_lanes(x, i, 16, b)
            _qx_rmse1_lanes(16, 32, b)
        xb = x[i]
        yb = y[i]
        max_scale = F32(0)
        max_abs_scale = F32(0)
        tame = _tame(xb)
        for ib in range(QK_K // 16):
            if tame:
                k = g * 16 + ib
                for ii in range(16):
                    L[16 * ib + ii] = np.int64(b[16 * LANES + ii * LANES + k]) + 32
                scale = b[3 * 16 * LANES + _SCALE * LANES + k]
            else:
                scale = make_qx_quants_rmse1(16, 32, xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
            scales[ib] = scale
            abs_scale = abs(scale)
            if abs_scale > max_abs_scale:
                max_abs_scale = abs_scale
                max_scale = scale
        if max_abs_scale < F32(1e-15):  # GROUP_MAX_EPS
            for j in range(yb.shape[0]):
                yb[j] = 0
            _put_fp16(yb, 208, fp32_to_fp16(F32(0)))
            continue
        iscale = F32(-128) / max_scale
        d_bits = fp32_to_fp16(F32(1) / iscale)
        _put_fp16(yb, 208, d_bits)
        for ib in range(QK_K // 16):
            s = min(127, nearest_int(iscale * scales[ib]))
            sc[ib] = ((s & 0xFF) ^ 0x80) - 0x80  # int8_t
            yb[192 + ib] = s & 0xFF
        dall = fp16_to_fp32(d_bits)
        for j in range(QK_K // 16):
            scales[j] = dall * F32(sc[j])  # d
        for t in range(QK_K):  # one loop of 256 that LLVM packs (a division: its operands stay put)
            d = scales[t // 16]
            l = _level(_div(xb[t], d), -32, 31) + 32
            L[t] = L[t] if d == 0 else l  # sub-blocks whose d is 0 keep their levels
        ql = 0
        qh = 128
        for j in range(0, QK_K, 128):
            for l in range(32):
                l1 = np.int64(L[j + l + 0])
                l2 = np.int64(L[j + l + 32])
                l3 = np.int64(L[j + l + 64])
                l4 = np.int64(L[j + l + 96])
                yb[ql + l + 0] = (l1 & 0xF) | ((l3 & 0xF) << 4)
                yb[ql + l + 32] = (l2 & 0xF) | ((l4 & 0xF) << 4)
                yb[qh + l] = (l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6)
            ql += 64
            qh += 32


KERNELS = {
    "Q2_K": quantize_row_q2_K,
    "Q3_K": quantize_row_q3_K,
    "Q4_K": quantize_row_q4_K,
    "Q5_K": quantize_row_q5_K,
    "Q6_K": quantize_row_q6_K,
}


def quantize(blocks: np.ndarray, out: np.ndarray, qtype: str) -> None:
    """Super-blocks ``blocks`` (S, 256) float32, C-contiguous, quantized as ``qtype`` (``Q4_K`` ...)
    into ``out`` (S, type size) uint8."""
    KERNELS[qtype](blocks, out)
