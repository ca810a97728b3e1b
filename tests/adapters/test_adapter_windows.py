"""OFT, BOFT and HRA merged through windows of their ``in x in`` matrix (kinds/rotation.py):
forced on tiny layers (nothing held whole, windows of 16 columns, a last window that overlaps
its neighbour, blocks of a few rows), bit for bit the whole-matrix path and peft's merge; C3A's
expansion by tiles of identity rows (kinds/c3a.py), forced small, bit for bit peft's whole one."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lora_factors
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
from lora_factors import SMALL_BLOCK, assert_matches, make, peft_merge, tiny_llama
from peft import BOFTConfig, C3AConfig, HRAConfig, OFTConfig
from peft.tuners.c3a.utils import get_circulant_fast
from safetensors.torch import load_file

from deltamerge import apply_delta
from deltamerge.compute_pool import one_torch_thread
from deltamerge.kinds import Scratch, c3a, rotation
from deltamerge.kinds.hra import HraDelta, gram_schmidt, householder, reflection_factors
from deltamerge.kinds.rotation import block_rows, windows

PARTS = ("oft_R", "oft_embedding_R", "boft_", "hra_u", "c3a_kernel")
CONFIGS = {
    # block 16 does not divide down_proj's 172 inputs (peft adjusts it to 4); an embedding
    "oft": lambda: OFTConfig(oft_block_size=16, target_modules=["q_proj", "down_proj", "embed_tokens"]),
    "oft-shared": lambda: OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, block_share=True,
                                    coft=True, eps=0.5, target_modules=["up_proj", "embed_tokens"]),
    "boft": lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hra": lambda: HRAConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "hra-gs": lambda: HRAConfig(r=3, apply_GS=True, target_modules=["k_proj", "down_proj"]),
    "c3a": lambda: C3AConfig(block_size=4, target_modules=["q_proj", "down_proj", "up_proj"],
                             block_size_pattern={"q_proj": 16}),
}
CASES = [("oft", torch.float16), ("oft-shared", torch.bfloat16), ("boft", torch.bfloat16),
         ("hra", torch.float16), ("hra-gs", torch.float32), ("c3a", torch.float16),
         ("c3a", torch.bfloat16)]


@pytest.fixture(autouse=True)
def _randomize_ours(monkeypatch) -> None:
    """``make`` randomizes these types' parameters too; BOFT does not try to build its CUDA
    extension (on CPU it fails, slowly, and peft goes on without it)."""
    monkeypatch.setattr(lora_factors, "ADAPTER_PARTS", (*lora_factors.ADAPTER_PARTS, *PARTS))
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


@pytest.mark.parametrize(("width", "size"), [(172, 16), (64, 16), (13824, 256), (20, 16), (8, 16), (40, 3)])
def test_windows_cover_every_column_none_narrow(width: int, size: int) -> None:
    """Every column in a window, no window narrower than 16 (or the whole width), and only the
    last one moved back over its neighbour."""
    spans = windows(width, size)
    assert spans[0][0] == 0 and spans[-1][1] == width
    assert all(b - a >= min(width, rotation.MIN_ROWS) for a, b in spans)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(spans[:-2], spans[1:-1]))
    if len(spans) > 1:
        assert spans[-1][0] <= spans[-2][1]


def test_block_rows_are_block_diag_rows() -> None:
    blocks = torch.randn(43, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = torch.block_diag(*blocks)
    for a, b in [(0, 172), (0, 16), (5, 21), (156, 172), (3, 4)]:
        assert torch.equal(block_rows(blocks, a, b), whole[a:b])
        assert torch.equal(block_rows(blocks.transpose(1, 2), a, b).t(), whole[:, a:b])


@pytest.mark.parametrize("apply_gs", [False, True])
def test_householder_windows_are_peft_matrix_columns(apply_gs: bool) -> None:
    """The reflections' factors followed 5 rows at a time, the columns rebuilt 16 at a time:
    each value the one peft's whole loop (``householder``) computes."""
    opt_u = torch.randn(172, 4, generator=torch.Generator().manual_seed(1))
    whole = householder(opt_u, apply_gs)
    u = gram_schmidt(opt_u) if apply_gs else opt_u / opt_u.norm(dim=0)
    tensors = {"u": u, "factors": reflection_factors(u, 5)}
    delta = HraDelta(None, {}, 64, apply_gs, 172)
    for a, b in windows(172, 16):
        assert torch.equal(delta.window(tensors, a, b, Scratch()), whole[:, a:b])


@pytest.mark.parametrize(("which", "dtype"), CASES,
                         ids=[f"{w}-{str(d).removeprefix('torch.')}" for w, d in CASES])
def test_windowed_merge_is_whole_merge_and_peft(tmp_path: Path, monkeypatch, request, which: str,
                                                dtype: torch.dtype) -> None:
    if which == "c3a":  # C3A tiles on one torch thread only; peft merges on one too, to compare
        request.addfinalizer(partial(torch.set_num_threads, torch.get_num_threads()))
        torch.set_num_threads(1)
    base = tiny_llama(tmp_path / "base", dtype)
    adapter = make(base, dtype, CONFIGS[which](), tmp_path / "adapter")
    apply_delta(base, adapter, tmp_path / "whole", block_size=SMALL_BLOCK)
    monkeypatch.setattr(rotation, "HOLD_BYTES", 0)
    monkeypatch.setattr(rotation, "WINDOW", 16)
    monkeypatch.setattr(c3a, "HOLD_BYTES", 0)
    monkeypatch.setattr(c3a, "TILE_BYTES", 1)  # tiles of 16 identity rows
    apply_delta(base, adapter, tmp_path / "windows", block_size=SMALL_BLOCK)
    whole, windowed = (load_file(tmp_path / n / "model.safetensors") for n in ("whole", "windows"))
    assert whole.keys() == windowed.keys()
    for name in whole:
        assert torch.equal(whole[name], windowed[name]), name
    assert_matches(tmp_path / "windows", peft_merge(base, dtype, [adapter]))



C3A_SHAPES = [(64, 172, 4), (172, 64, 4), (64, 64, 16), (96, 352, 32), (256, 512, 64), (256, 256, 128),
              (512, 768, 256)]


@pytest.mark.parametrize(("out_dim", "in_dim", "b"), C3A_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["f16", "bf16", "f32"])
def test_c3a_tiles_are_peft_whole_expansion(out_dim: int, in_dim: int, b: int,
                                            dtype: torch.dtype) -> None:
    """Tiles of 16 and 23 identity rows (the last one overlapping its neighbour: no width here
    is a multiple of 23, 172 none of 16) give peft's ``get_delta_weight`` bit for bit, both on
    one torch thread (where ``delta`` tiles by itself)."""
    kernel = torch.randn(out_dim // b, in_dim // b, b, generator=torch.Generator().manual_seed(b))
    with one_torch_thread():
        whole = get_circulant_fast(kernel).to(dtype) / in_dim
        tiled = [c3a.delta(kernel, dtype, tile) for tile in (16, 23)]
    for tile, got in zip((16, 23), tiled):
        assert len(windows(in_dim, tile)) > 1
        assert got.dtype == dtype
        assert torch.equal(got, whole)
