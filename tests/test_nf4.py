"""NF4 round trips against bitsandbytes itself (its CPU path), whole and a block of rows at a time."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import deltamerge.kinds.nf4 as nf4
from deltamerge.errors import InputError

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no CPU gemm_4bit kernel": irrelevant
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Sizes that are and are not whole blocks of 64, rows shorter than a block, more than 256 blocks
# (double quantization's absmax blocks) with a partial last one, a 1-D tensor.
SHAPES = [(4, 64), (1, 6), (100, 100), (300, 256), (37, 48), (3, 80), (64,)]


def bnb_quantize(w: torch.Tensor, dq: bool):
    return F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4",
                           quant_storage=torch.uint8)


def bnb_roundtrip(w: torch.Tensor, dq: bool) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit(quantize_4bit(w)), in w's shape.

    Its AVX-512 dequantize kernel looks absmax up per row (``row * (n // 64) + col // 64``), which
    disagrees with its own quantization when a row is not whole blocks yet a multiple of 16 long
    (37 x 48, 3 x 80 above); asked for the same codes as one flat row it indexes as quantize did.
    """
    q, state = bnb_quantize(w, dq)
    flat = copy.copy(state)
    flat.shape = torch.Size([w.numel()])
    out = F.dequantize_4bit(q, flat).reshape(w.shape)
    if w.dim() < 2 or w.shape[-1] % 64 == 0 or w.shape[-1] % 16:
        assert torch.equal(out, F.dequantize_4bit(q, state).reshape(w.shape))
    return out


def unpack(q: torch.Tensor, n: int) -> torch.Tensor:
    q = q.view(-1)
    return torch.stack([q >> 4, q & 15], dim=1).view(-1)[:n].to(torch.int32)


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def test_codes_are_bitsandbytes_codes() -> None:
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), F.create_dynamic_map())


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_and_roundtrip_match_bitsandbytes(shape, dtype, dq) -> None:
    w = weights(shape, dtype)
    q, state = bnb_quantize(w, dq)
    codes, absmax = nf4.quantize(w)
    assert torch.equal(codes, unpack(q, w.numel()))
    prep = nf4.Nf4Prepare(shape, dq)
    prep.add(w, 0)
    mine = prep.finish()
    if dq:
        assert torch.equal(mine.absmax_codes, state.absmax)
        assert torch.equal(mine.absmax2, state.state2.absmax)
        assert torch.equal(mine.offset, state.offset)
    else:
        assert torch.equal(absmax, state.absmax)
    got = nf4.nf4_roundtrip(w, mine, 0)
    assert got.dtype == dtype
    assert torch.equal(got, bnb_roundtrip(w, dq))


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
def test_odd_rows_match_bitsandbytes_default_kernel(dq) -> None:
    """An odd last dimension sends dequantize_4bit to bitsandbytes' torch kernel (compiled: slow)."""
    w = weights((5, 33), torch.float16)
    assert torch.equal(nf4.nf4_roundtrip_tensor(w, dq), bnb_roundtrip(w, dq))


def edge_weights() -> torch.Tensor:
    """Blocks of 64 that probe the rules: ties, zeros, subnormals, extremes, a short last block."""
    mids = nf4._nf4_bounds()
    up = torch.nextafter(mids, torch.ones_like(mids))
    down = torch.nextafter(mids, -torch.ones_like(mids))
    ties = torch.cat([torch.tensor([1.0]), mids, up, down, -mids, -up, -down])
    ties = torch.cat([ties, torch.zeros(128 - ties.numel())])
    halved = ties[:64] * 0.5  # absmax 0.5: x * (1 / 0.5) is exact, so the ties survive scaling
    blocks = [
        ties[:64], ties[64:128], halved,
        torch.zeros(64),
        torch.full((64,), -0.0),
        torch.linspace(-1e-40, 1e-40, 64),  # fp32 subnormals
        torch.linspace(-1, 1, 64) * 3e38,
        torch.tensor([65504.0, -65504.0] * 32),
        torch.linspace(-1, 1, 64) * 1e-3,
    ]
    return torch.cat([*blocks, torch.zeros(6)])  # a short last block of zeros (absmax clamped)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
def test_edge_values_match_bitsandbytes(dq) -> None:
    w = edge_weights()
    assert torch.equal(nf4.nf4_roundtrip_tensor(w, dq), bnb_roundtrip(w, dq))
    codes, absmax = nf4.quantize(w)
    q, state = bnb_quantize(w, dq)
    assert torch.equal(codes, unpack(q, w.numel()))
    if not dq:
        assert torch.equal(absmax, state.absmax)


def test_blocks_of_equal_absmax() -> None:
    """Every block's absmax the same: absmax - mean is (nearly) zero, absmax2 may be zero."""
    w = torch.tensor([0.5, -0.25] * 32 * 600)
    assert torch.equal(nf4.nf4_roundtrip_tensor(w, True), bnb_roundtrip(w, True))


def test_8bit_table_lookup_matches_bitsandbytes() -> None:
    """Values at the kernel's 65536-point grid's rounding edges and at the 8-bit map's midpoints."""
    code = nf4.dynamic_code()
    k = torch.arange(1, 65536, dtype=torch.float64)
    edges = ((k - 0.5) / 65535 * 2 - 1).to(torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    parts = [torch.rand(256 * 64, generator=torch.Generator().manual_seed(3)) * 2 - 1]
    for centre in (edges, mids):
        for toward in (-2.0, 2.0):  # two fp32 steps either side
            step = centre
            for _ in range(2):
                step = torch.nextafter(step, torch.full_like(step, toward))
                parts.append(step)
        parts.append(centre)
    v = torch.cat(parts).clamp(-1, 1)
    v = torch.cat([v, torch.zeros(-v.numel() % 255)]).view(-1, 255)
    x = torch.cat([v, torch.ones(v.shape[0], 1)], dim=1).view(-1)  # absmax 1: v is what is looked up
    x = torch.cat([x, torch.zeros(256), x[:100] * 3e-7])  # a block of zeros; a short last block
    q, state = F.quantize_blockwise(x, blocksize=256)
    codes, absmax = nf4.quantize_8bit(x)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(codes, q)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("shape", [(37, 48), (100, 100), (300, 256), (333, 7)], ids=str)
def test_row_blocks_give_the_whole_tensors_bits(shape, dq) -> None:
    w = weights(shape, torch.float16, seed=1)
    whole = nf4.nf4_roundtrip_tensor(w, dq)
    row_numel = w[0].numel()
    step = nf4.aligned_rows(29, row_numel)
    assert step % nf4.row_multiple(row_numel) == 0 and step * row_numel % 64 == 0
    starts = range(0, shape[0], step)
    prep = nf4.Nf4Prepare(shape, dq, "t")
    for r0 in reversed(starts):  # any order
        prep.add(w[r0 : r0 + step], r0)
    state = prep.finish()
    out = torch.empty_like(w)
    for r0 in starts:
        nf4.nf4_roundtrip(w[r0 : r0 + step], state, r0, out=out[r0 : r0 + step])
    assert torch.equal(out, whole)


def test_alignment_rule() -> None:
    assert [nf4.row_multiple(n) for n in (4096, 11008, 100, 48, 7, 1)] == [1, 1, 16, 4, 64, 64]
    assert nf4.aligned_rows(30, 100) == 16 and nf4.aligned_rows(3, 100) == 16
    w = weights((40, 100), torch.float16)
    state = nf4.Nf4Prepare((40, 100), False).finish()
    with pytest.raises(InputError, match="multiple of 16"):
        nf4.nf4_roundtrip(w[8:24], state, 8)
    assert torch.equal(nf4.nf4_roundtrip(w[32:], state, 32), nf4.nf4_roundtrip_tensor(w, False)[32:])
    prep = nf4.Nf4Prepare((40, 100), True, "t")
    prep.add(w[:16], 0)
    with pytest.raises(InputError, match="saw 1600 of 4000"):
        prep.finish()


def test_quantizing_in_fp32_gives_fp16_codes() -> None:
    """A base loaded in fp32 is quantized from the same values: only the dequantized dtype changes."""
    w = weights((30, 64), torch.float16)
    got = nf4.nf4_roundtrip_tensor(w, True, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, bnb_roundtrip(w.float(), True))


def test_thread_count_changes_only_what_bitsandbytes_changes() -> None:
    """Over 32768 blocks torch's fp32 mean depends on its threads; at each, both agree."""
    w = weights((1024, 4096), torch.bfloat16, seed=2)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(nf4.nf4_roundtrip_tensor(w, True), bnb_roundtrip(w, True))
    finally:
        torch.set_num_threads(before)
