"""The compute pool (``--threads``): LoRA products, LoHa's pairs of products and GGUF quantization
give the same bytes on 1, 2 or 3 threads, and the k-quants' fast sums are the C code's running sums."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from gguf_models import wide_llama
from helpers import load_state
from lora_factors import ALL, SMALL_BLOCK, make, make_adapter, peft_merge, tiny_llama
from peft import LoHaConfig

import deltamerge.kinds.lora as lora
import deltamerge.sinks.gguf as gguf_module
from deltamerge import apply_delta
from deltamerge.compute_pool import ComputePool
from deltamerge.sinks import gguf_quants

THREADS = (1, 2, 3)


def test_lora_and_dora_merge_the_same_on_any_threads(tmp_path: Path, monkeypatch) -> None:
    """Windows of 16 rows and blocks of several windows (tall ffn tensors): 1, 2 and 3 threads
    compute them in batches of 1, 2 and 3, and every tensor is peft's, bit for bit."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", 16)
    monkeypatch.setattr(lora, "MERGE_ROWS", 5)
    base = tiny_llama(tmp_path / "base", torch.float16, ffn=300)
    plain = make_adapter(base, torch.float16, tmp_path / "lora", r=8, lora_alpha=16, target_modules=ALL)
    dora = make_adapter(base, torch.float16, tmp_path / "dora", seed=2, r=4, lora_alpha=8,
                        target_modules=["q_proj", "up_proj", "down_proj"], use_dora=True)
    for adapter in (plain, dora):
        reference = peft_merge(base, torch.float16, [adapter])
        for threads in THREADS:
            out = tmp_path / f"{adapter.name}-{threads}"
            apply_delta(base, adapter, out, block_size=20_000, threads=threads)
            got = load_state(out)
            assert set(got) == set(reference)
            for name, tensor in got.items():
                assert torch.equal(tensor, reference[name]), (adapter.name, threads, name)


def test_loha_merges_the_same_on_any_threads(tmp_path: Path, monkeypatch) -> None:
    """LoHa's windows (16 rows), each one's two products side by side on the pool, on 1, 2 and 3
    threads, in blocks of a few rows and of several windows: every tensor is peft's, bit for bit."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", 16)
    monkeypatch.setattr(lora, "MERGE_ROWS", 5)
    base = tiny_llama(tmp_path / "base", torch.float16, ffn=300)
    config = LoHaConfig(r=8, alpha=4, target_modules=ALL, rank_pattern={"down_proj": 4})
    adapter = make(base, torch.float16, config, tmp_path / "loha")
    reference = peft_merge(base, torch.float16, [adapter])
    for threads in THREADS:
        for block in (SMALL_BLOCK, 20_000):
            out = tmp_path / f"out-{threads}-{block}"
            apply_delta(base, adapter, out, block_size=block, threads=threads)
            got = load_state(out)
            assert set(got) == set(reference)
            for name, tensor in got.items():
                assert torch.equal(tensor, reference[name]), (threads, block, name)


def test_q4_k_m_bytes_are_the_same_on_any_threads(
    tmp_path: Path, sp_model: bytes, monkeypatch  # noqa: F811
) -> None:
    """A q4_k_m GGUF in pieces of 8 rows on 1, 2 and 3 threads: the same file, byte for byte."""
    monkeypatch.setattr(gguf_module, "_QUANT_CHUNK_ELEMENTS", 8 * 256)
    base = wide_llama(tmp_path / "base", sp_model, torch.float16)
    delta = wide_llama(tmp_path / "delta", sp_model, torch.float16, seed=1)
    files = []
    for threads in THREADS:
        out = tmp_path / str(threads) / "model"  # the same name: GGUF's metadata holds it
        out.parent.mkdir()
        apply_delta(base, delta, out, format="gguf", outtype="q4_k_m", threads=threads)
        files.append({p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".gguf"})
    assert files[0] and files[0] == files[1] == files[2]


@pytest.mark.parametrize("rows", [16, 17, 32, 33])
@pytest.mark.parametrize("columns", [128, 96])
def test_seq_sum_is_the_running_sum(rows: int, columns: int) -> None:
    """``float s = 0; s += t[i]...`` per column, for terms of very different magnitudes (where
    any other order of additions rounds differently), on the fast path (columns in groups of 64,
    one torch thread) and on the loop's."""
    g = torch.Generator().manual_seed(rows * columns)
    scales = 10.0 ** torch.randint(-6, 7, (rows, columns), generator=g)
    terms = torch.randn(rows, columns, generator=g) * scales
    expected = torch.zeros(columns)
    for t in terms:
        expected = expected + t
    out = torch.empty(columns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq_sum = gguf_quants._SeqSum(terms.clone(), out)
        assert (seq_sum.last is not None) == (columns % 64 == 0)  # torch's sum, or the loop
        seq_sum()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected)
    pairwise = torch.sum(terms, 0)  # what a sum in another order gives: the test can tell
    assert rows <= 17 or not torch.equal(pairwise, expected)


def test_pool_maps_in_order_and_waits_for_every_piece() -> None:
    pool = ComputePool(3)
    try:
        assert pool.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]
        assert pool.map(lambda _: torch.get_num_threads(), range(6)) == [1] * 6
        done: list[int] = []
        gate = threading.Event()

        def piece(i: int) -> None:
            if i == 0:
                raise ValueError("the first piece fails")
            gate.wait(5)
            done.append(i)

        threading.Timer(0.2, gate.set).start()
        with pytest.raises(ValueError, match="first piece"):
            pool.map(piece, range(3))
        assert sorted(done) == [1, 2]  # the others had finished before the error came back
    finally:
        pool.close()
