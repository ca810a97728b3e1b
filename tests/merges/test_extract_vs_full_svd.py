"""The streamed randomized SVD of ``make-delta --kind lora`` against mergekit's full SVD.

mergekit-extract-lora factors each difference by ``torch.linalg.svd`` in fp32, truncated at the
rank: the least error any rank-r factors can have. A fine-tune's difference has a flat spectrum
(Gemma 3 270M's 60-step full fine-tune: 55% relative error left at rank 64, docs/performance.md),
where the range finder's sample must reach well past the rank: a fixed 10 extra columns left
that pair's errors 1.0 to 1.5% above the full SVD's at rank 64.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from deltamerge.kinds import lora_extract
from deltamerge.sources import open_checkpoint

NAME = "model.layers.0.mlp.up_proj.weight"
ROWS, COLS, RANK = 384, 256, 32


def flat_pair(tmp: Path) -> tuple[Path, Path, torch.Tensor]:
    """A base and a target whose difference has singular values decaying as k^-1/4."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(ROWS, COLS, generator=g) * 0.02
    u = torch.linalg.qr(torch.randn(ROWS, COLS, generator=g)).Q
    v = torch.linalg.qr(torch.randn(COLS, COLS, generator=g)).Q
    s = (torch.arange(COLS) + 1.0) ** -0.25
    target = base + (u * s) @ v.T * 0.01
    save_file({NAME: base}, tmp / "base.safetensors")
    save_file({NAME: target}, tmp / "target.safetensors")
    return tmp / "base.safetensors", tmp / "target.safetensors", target - base


def mergekit_error(diff: torch.Tensor, rank: int) -> float:
    """What mergekit-extract-lora's factors leave: U sqrt(S) and sqrt(S) Vh of the full SVD."""
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    root = s[:rank].sqrt()
    return float((diff - (u[:, :rank] * root) @ (root[:, None] * vh[:rank])).norm() / diff.norm())


def test_flat_spectrum_within_one_percent_of_mergekits_full_svd(tmp_path: Path) -> None:
    base_path, target_path, diff = flat_pair(tmp_path)
    reference = mergekit_error(diff, RANK)
    errors = {}
    with open_checkpoint(base_path) as base, open_checkpoint(target_path) as target:
        for oversample in (lora_extract.OVERSAMPLE, None):  # the old fixed 10, the default
            found = lora_extract.factorize(base, target, NAME, RANK, block_bytes=3000,
                                           oversample=oversample)
            assert found is not None and found.lora_a.shape == (RANK, COLS)
            errors[oversample] = float((diff - found.lora_b @ found.lora_a).norm() / diff.norm())
    assert errors[None] <= reference * 1.01, (errors, reference)
    assert errors[lora_extract.OVERSAMPLE] > reference * 1.01  # what the default fixes


def test_oversampling_grows_with_the_rank() -> None:
    assert lora_extract.oversampling(4) == lora_extract.OVERSAMPLE
    assert lora_extract.oversampling(64) == 64
