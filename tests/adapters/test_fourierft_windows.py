"""FourierFT's deltas by windows of rows (kinds/fourierft.py): MKL's ``ifft2`` as the rows' 1-D
transforms, then the columns', forced on small shapes (windows, pieces of columns and slabs of
the rows' pass that divide no side evenly), bit for bit peft's ``get_delta_weight`` and, merged,
peft's ``merge_and_unload``; and ``randperm``'s first values drawn without the permutation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lora_factors
import pytest
import torch
from lora_factors import SMALL_BLOCK, assert_matches, make, peft_merge, tiny_llama
from peft import FourierFTConfig
from peft.tuners.fourierft.layer import FourierFTLinear
from transformers import GPT2Config, GPT2LMHeadModel

from deltamerge import apply_delta
from deltamerge.kinds import Scratch, fourierft
from deltamerge.kinds.fourierft import SpectrumDelta, first_of_randperm

# (window, column piece, rows' pass held) bytes for the merges: a window of the weight's rows,
# complex columns per columns' pass, the rows' pass held whole (1 GiB) or formed in slabs
BUDGETS = {"held": (5000, 20000, 1 << 30), "slabs": (20000, 20000, 20000)}
# the same in the delta's units: 41 rows a window, 13 columns a piece, slabs of 37 columns
UNITS = {"held": (41, 13, None), "slabs": (41, 13, 37)}


@pytest.mark.parametrize(("size", "n", "seed"), [(10, 9, 0), (1000, 999, 3), (64 * 172, 70, 5),
                                                 (1_000_003, 1000, 777)])
def test_first_of_randperm_is_randperm(size: int, n: int, seed: int) -> None:
    whole = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first_of_randperm(size, n, seed), whole[:n])


def peft_delta(out_dim: int, in_dim: int, spectrum: torch.Tensor, seed: int, scaling: float) -> torch.Tensor:
    """peft's own ``get_delta_weight``, on a layer of that shape holding ``spectrum``."""
    layer = FourierFTLinear(torch.nn.Linear(in_dim, out_dim, bias=False), "default",
                            FourierFTConfig(scaling=scaling, random_loc_seed=seed),
                            n_frequency=spectrum.shape[0])
    with torch.no_grad():
        layer.fourierft_spectrum["default"].copy_(spectrum)
    return layer.get_delta_weight("default")


def windowed(out_dim: int, in_dim: int, spectrum: torch.Tensor, seed: int, scaling: float,
             transposed: bool) -> torch.Tensor:
    """The weight's rows of the delta, asked for 3, 5, 7, 2, 4, ... rows at a time (each request
    past the window starts a new one there)."""
    source = SimpleNamespace(load=lambda key: spectrum.clone())
    delta = SpectrumDelta(source, {"fourierft_spectrum": "spectrum"}, (out_dim, in_dim), seed,
                          scaling, transposed)
    got = torch.zeros((in_dim, out_dim) if transposed else (out_dim, in_dim))
    scratch, r0, ask = Scratch(), 0, 3
    while r0 < got.shape[0]:
        r1 = min(got.shape[0], r0 + ask)
        delta.combine(got[r0:r1], r0, scratch)
        r0, ask = r1, ask % 7 + 2
    delta.release()
    return got


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(("out_dim", "in_dim", "n"), [(64, 172, 200), (172, 64, 60), (96, 600, 900),
                                                      (300, 300, 150), (8, 9, 71)])
def test_windows_are_peft_whole_delta(monkeypatch, budget: str, transposed: bool, out_dim: int,
                                      in_dim: int, n: int) -> None:
    """Wider than tall (MKL scales after the columns' pass), taller or square (after the rows'),
    on Linear and Conv1D layouts: every value as peft's whole ``ifft2`` makes it."""
    rows, cols, slab = UNITS[budget]
    held = fourierft.positions(out_dim, in_dim, n, 5)[0].unique().numel()
    monkeypatch.setattr(fourierft, "WINDOW_BYTES", rows * 4 * (out_dim if transposed else in_dim))
    monkeypatch.setattr(fourierft, "COLUMN_BYTES", cols * 8 * max(out_dim, in_dim))
    monkeypatch.setattr(fourierft, "LINES_BYTES", 1 << 30 if slab is None else slab * 8 * held)
    spectrum = torch.randn(n, generator=torch.Generator().manual_seed(n))
    whole = peft_delta(out_dim, in_dim, spectrum, 5, 30.0)
    got = windowed(out_dim, in_dim, spectrum, 5, 30.0, transposed)
    assert torch.equal(got, whole.T if transposed else whole)


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize(("dtype", "budget"), [(F16, "held"), (BF16, "slabs"), (F32, "held")],
                         ids=["f16-held", "bf16-slabs", "f32-held"])
def test_windowed_merge_is_peft_merge(tmp_path: Path, monkeypatch, dtype: torch.dtype, budget: str) -> None:
    """Every module by windows (nothing whole), blocks of 3 or 4 rows: peft's merge_and_unload."""
    monkeypatch.setattr(lora_factors, "ADAPTER_PARTS", (*lora_factors.ADAPTER_PARTS, "fourierft_spectrum"))
    base = tiny_llama(tmp_path / "base", dtype)
    config = FourierFTConfig(target_modules=["q_proj", "gate_proj", "down_proj"], n_frequency=60,
                             scaling=30.0, random_loc_seed=11, n_frequency_pattern={"down_proj": 300})
    adapter = make(base, dtype, config, tmp_path / "adapter")
    window, column, lines = BUDGETS[budget]
    for name, value in (("HOLD_BYTES", 0), ("WINDOW_BYTES", window), ("COLUMN_BYTES", column),
                        ("LINES_BYTES", lines)):
        monkeypatch.setattr(fourierft, name, value)
    assert not fourierft.held_whole(64, 172) and not fourierft.held_whole(64, 64)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, [adapter]))


def test_windowed_conv1d_merge_is_peft_merge(tmp_path: Path, monkeypatch) -> None:
    """GPT-2's Conv1D (``fan_in_fan_out``): a window of the weight's rows is the delta's columns."""
    monkeypatch.setattr(lora_factors, "ADAPTER_PARTS", (*lora_factors.ADAPTER_PARTS, "fourierft_spectrum"))
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
                    ).to(BF16).save_pretrained(base, safe_serialization=True)
    config = FourierFTConfig(n_frequency=40, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapter = make(base, BF16, config, tmp_path / "adapter", cls=GPT2LMHeadModel)
    for name, value in (("HOLD_BYTES", 0), ("WINDOW_BYTES", 1000), ("COLUMN_BYTES", 4000),
                        ("LINES_BYTES", 1500)):
        monkeypatch.setattr(fourierft, name, value)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, BF16, [adapter], cls=GPT2LMHeadModel))
