"""The numba k-quants' lanes (``gguf_kquants_numba``): many sub-blocks searched side by side give
each sub-block the bytes the C code gives it alone.

The scale searches run on 64 sub-blocks at once (8 super-blocks of Q4_K/Q5_K, 4 of the
others), each lane taking its own branches as per-lane selects; super-blocks with NaN, infinities or values
beyond ``TAME`` take the scalar code. Checked here against the torch port (itself checked against
the C code's goldens in ``test_kquants.py``), byte for byte: groups where only some lanes return
early (all-zero, constant, below GROUP_MAX_EPS), where only some lanes clamp the min, take a
trial or go on refining, tame super-blocks next to wild ones in one group, a last group that is
part padding, and values at the edge of tame. And that a super-block's bytes do not depend on
its neighbours. (A packed add that swaps two NaNs shows only on rare random-bit rows: ``test_kquants_numba``'s
random rows are the ones that caught it, when every super-block took the lanes.)
"""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
pytest.importorskip("numba", reason="numba is not installed: quantize_rows runs the torch port only")

from deltamerge.sinks import gguf_kquants_numba, gguf_quants  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QT = gguf.GGMLQuantizationType


def sub_block_mix(n_super: int, seed: int) -> torch.Tensor:
    """``n_super`` super-blocks (n_super, 256) whose 16-value pieces are, by turns: normal values,
    zeros, a negative constant, values below GROUP_MAX_EPS, only positive values, two distinct
    values, values whose max - min is subnormal, and normal values at a far larger scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_super, 16, 16, generator=g)
    kind = torch.randint(0, 8, (n_super, 16), generator=g)
    x[kind == 1] = 0.0
    x[kind == 2] = -0.75
    x[kind == 3] *= 1e-17
    x[kind == 4] = x[kind == 4].abs() + 0.5
    x[kind == 5] = torch.where(x[kind == 5] > 0, 1.25, -0.5)
    x[kind == 6] = 3.0 + torch.randint(0, 2, x[kind == 6].shape, generator=g) * 2.0 ** -149
    x[kind == 7] *= 3000.0
    return x.reshape(n_super, 256)


def random_bits(n_super: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n_super, 256), generator=g, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def tame_and_wild(seed: int) -> torch.Tensor:
    """Eleven super-blocks, wild ones among tame ones in each group: NaN, an infinity, 65537, a
    value beyond fp16's range, random float32 bits (NaNs with payloads, where the order of a
    packed add's operands would show); and tame ones with TAME itself and -TAME."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, 256, generator=g) * 0.02
    x[2] = random_bits(1, seed)[0]
    x[1, 7] = float("nan")
    x[3, 200] = float("-inf")
    x[4, 0] = 65537.0
    x[6, 99] = 1e30
    x[8, 31] = 65536.0
    x[9, 32] = -65536.0
    x[10, :128] *= 1e4
    return x


def rows() -> torch.Tensor:
    return torch.cat([sub_block_mix(13, 3), sub_block_mix(9, 4), tame_and_wild(5), random_bits(8, 6)])


def numba_bytes(blocks: torch.Tensor, qtype: str) -> np.ndarray:
    x = np.ascontiguousarray(blocks.numpy())
    out = np.zeros((x.shape[0], gguf.GGML_QUANT_SIZES[QT[qtype]][1]), np.uint8)
    gguf_kquants_numba.quantize(x, out, qtype)
    return out


@pytest.mark.parametrize("qtype", KTYPES)
def test_lanes_give_the_torch_ports_bytes(qtype: str, monkeypatch: pytest.MonkeyPatch):
    blocks = rows()
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, "torch")
    ported = quantize_rows(blocks, QT[qtype])
    compiled = torch.from_numpy(numba_bytes(blocks, qtype))
    assert torch.equal(compiled, ported)


@pytest.mark.parametrize("qtype", KTYPES)
def test_a_super_blocks_bytes_do_not_depend_on_its_neighbours(qtype: str):
    """Each super-block quantized alone (its group all padding but itself), or after a shift of
    one, lands in other lanes and other groups: the same bytes."""
    blocks = rows()
    whole = numba_bytes(blocks, qtype)
    alone = np.concatenate([numba_bytes(blocks[i:i + 1], qtype) for i in range(0, blocks.shape[0], 5)])
    assert np.array_equal(alone, whole[::5])
    shifted = numba_bytes(blocks[1:], qtype)
    assert np.array_equal(shifted, whole[1:])
