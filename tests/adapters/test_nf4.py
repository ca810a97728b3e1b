"""NF4 round trips against bitsandbytes itself (its CPU path), whole and a block of rows at a time."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from lora_factors import peft_4bit_view, randomize_lora

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


def test_double_quant_offset_is_the_one_thread_mean() -> None:
    """Over 32768 blocks torch's fp32 mean depends on its threads, so bitsandbytes' does too;
    the round trip here is bitsandbytes' under one thread, whatever the thread count. (For these
    fp32 weights bitsandbytes' offset under 3 threads is one ulp off, and 68% of its round trip
    differs from its own under one thread.)"""
    w = weights((1024, 4096), torch.float32, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = bnb_roundtrip(w, True)
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(nf4.nf4_roundtrip_tensor(w, True), reference)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


# -- QLoRA-faithful merges, against peft's own Linear4bit.merge on a bitsandbytes 4-bit model --

HIDDEN, FFN = 64, 300  # down_proj rows of 300: blocks of 16 rows; 300 blocks of absmax: two of 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL_BLOCK = 1000  # bytes: a few rows a block, so every tensor streams in several


def tiny_llama(folder, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=96)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def random_adapter(base, dtype: torch.dtype, out, targets=TARGETS):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    randomize_lora(model)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("base_dtype, quant_dtype, out_dtype, dq", [
    (torch.float16, None, None, True),
    (torch.float16, None, None, False),
    (torch.bfloat16, None, None, True),
    (torch.float32, None, None, True),
    (torch.float16, torch.bfloat16, None, True),  # Guanaco: an fp16 LLaMA loaded in bf16
    (torch.float16, torch.float32, torch.float32, True),
], ids=["fp16-dq", "fp16", "bf16-dq", "fp32-dq", "fp16-as-bf16-dq", "fp16-as-fp32-dq-out-fp32"])
def test_qlora_merge_is_peft_4bit_merge_rounded_once(
    tmp_path, monkeypatch, base_dtype, quant_dtype, out_dtype, dq
) -> None:
    from helpers import load_state

    from deltamerge import apply_delta

    base = tiny_llama(tmp_path / "base", base_dtype)
    adapter = random_adapter(base, base_dtype, tmp_path / "adapter")
    merged = peft_4bit_view(base, adapter, dq, quant_dtype or base_dtype, monkeypatch)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK, workers=2,
                qlora="nf4-dq" if dq else "nf4", qlora_dtype=quant_dtype, dtype=out_dtype,
                qlora_kernel="cpu")
    got, original = load_state(tmp_path / "out"), load_state(base)
    assert len(merged) == 14 and set(merged) < set(got) == set(original)
    for name, tensor in got.items():
        want = merged[name] if name in merged else original[name]
        want = want.to(out_dtype or base_dtype)
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name


def test_qlora_merge_is_merge_and_unload_onto_the_roundtrip(tmp_path) -> None:
    """The same, built as the issue puts it: bitsandbytes' round trip of the targeted weights
    put into an fp16 model, then peft's merge_and_unload (the Linear layers peft merges in fp16)."""
    from helpers import load_state
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from deltamerge import apply_delta

    base = tiny_llama(tmp_path / "base", torch.float16)
    adapter = random_adapter(base, torch.float16, tmp_path / "adapter", ["q_proj", "down_proj"])
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                p.copy_(bnb_roundtrip(p.data, True))
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK, qlora="nf4-dq",
                qlora_scope="targets", qlora_kernel="cpu")
    got = load_state(tmp_path / "out")
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
    plain = tmp_path / "plain"
    apply_delta(base, adapter, plain, block_size=SMALL_BLOCK)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(load_state(plain)[name], got[name])  # the round trip shows


def test_qlora_options_are_checked(tmp_path) -> None:
    from helpers import apply_in_process, llama_state, save_checkpoint

    base = tiny_llama(tmp_path / "base", torch.float16)
    adapter = random_adapter(base, torch.float16, tmp_path / "adapter", ["q_proj"])
    code, err = apply_in_process(base, adapter, tmp_path / "o1", "--qlora-dtype", "bfloat16")
    assert code == 2 and "needs --qlora" in err
    additive = save_checkpoint(llama_state(3), tmp_path / "add")
    code, err = apply_in_process(base, additive, tmp_path / "o2", "--qlora", "nf4")
    assert code == 2 and "no delta is a LoRA" in err
    code, err = apply_in_process(base, adapter, adapter, tmp_path / "o3", "--qlora", "nf4-dq",
                                 "--allow-repeat")
    assert code == 2 and "an earlier delta changes them" in err
    from deltamerge import apply_delta

    # without double quantization each step rounds what it is given: a chain is fine
    assert apply_delta(base, [adapter, adapter], tmp_path / "o4", qlora="nf4",
                       allow_repeat=True).kinds == ["lora"] * 2
    assert not any(tmp_path.glob("o[123]*"))
