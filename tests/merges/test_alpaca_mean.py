"""Rows a delta adds start at Alpaca's mean of the base's rows, bit for bit, at the real shape.

Alpaca's ``smart_tokenizer_and_embedding_resize`` runs on the base loaded in fp32:
``embeddings[:-1].mean(dim=0, keepdim=True)`` after the resize. That is torch's CPU sum, in its
own order of additions, then a division; an fp64 sum rounded once differs in the last bits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import llama_state, load_state, save_checkpoint
from safetensors.torch import save_file

import deltamerge
from deltamerge.apply import fill_means
from deltamerge.engine.cascade_sum import TorchRowSum
from deltamerge.engine.plan import TensorJob, rows_per_block
from deltamerge.sizes import DEFAULT_BLOCK_BYTES
from deltamerge.sources import open_checkpoint
from deltamerge.tensor_spec import TensorSpec

EMBED = "model.embed_tokens.weight"


def alpaca_mean(stored: torch.Tensor, new_rows: int = 1) -> torch.Tensor:
    """weight_diff.py recover: the base in fp32, resized, then the mean of the old rows."""
    resized = torch.zeros(stored.shape[0] + new_rows, *stored.shape[1:])
    resized[: stored.shape[0]] = stored
    return resized[:-new_rows].mean(dim=0, keepdim=True)[0]


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32) != b.view(torch.int32)).sum())


def test_mean_row_is_alpacas_at_the_real_shape(tmp_path: Path) -> None:
    """32000 x 4096 fp16 embeddings, read a block of rows at a time as apply reads them."""
    rows, width = 32000, 4096
    g = torch.Generator().manual_seed(7)
    stored = torch.empty(rows, width, dtype=torch.float16).normal_(0, 0.02, generator=g)
    folder = tmp_path / "base"
    folder.mkdir()
    save_file({EMBED: stored}, folder / "model.safetensors")
    expected = alpaca_mean(stored)
    rounded_once = (stored[:, :512].double().sum(0) / rows).float()
    assert differing(rounded_once, expected[:512]) > 10  # what an fp64 sum got wrong

    with open_checkpoint(folder) as base:
        job = TensorJob(TensorSpec(EMBED, torch.float16, (rows + 1, width)), base.specs[EMBED],
                        fill="mean")
        job.rows_per_block = rows_per_block(job, DEFAULT_BLOCK_BYTES)
        assert job.rows_per_block < rows  # streamed: several blocks
        fill_means(base, [job], DEFAULT_BLOCK_BYTES)
    assert job.mean is not None and job.mean.dtype == torch.float32
    assert differing(job.mean, expected) == 0


def test_torch_order_for_any_width_and_blocks() -> None:
    """Widths off the 32-column groups take torch's other order; any block cut gives one sum."""
    torch.set_num_threads(1)  # torch's own order for widths that are no multiple of 32
    for rows, width in ((5, 3), (17, 8), (300, 20), (1000, 100), (4099, 64)):
        x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
        expected = x.mean(dim=0)
        for block in (1, 7, 16, rows):
            summed = TorchRowSum(rows, width)
            for r0 in range(0, rows, block):
                summed.add(x[r0 : r0 + block])
            assert differing(summed.mean(), expected) == 0, (rows, width, block)


def test_apply_mean_rows_match_alpaca_on_an_fp32_model(tmp_path: Path) -> None:
    """The tiny fp32 model on which the fp64 mean differed in 50 of 64 elements."""
    base = llama_state(0, torch.float32, vocab=96)
    delta = llama_state(1, torch.float32, vocab=97, scale=0.01)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(delta, tmp_path / "delta")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out",
                           new_rows="mean", block_size=1024)
    out = load_state(tmp_path / "out")
    for name in (EMBED, "lm_head.weight"):
        assert torch.equal(out[name][96], alpaca_mean(base[name]) + delta[name][96]), name
