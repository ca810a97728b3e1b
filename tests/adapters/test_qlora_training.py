"""QLoRA merged onto what training saw (every Linear layer rounded through NF4, the CUDA kernels'
rules), peft's ``safe_merge``, and the LoRA types peft cannot merge (issue 23 items 1, 2 and 4).

bitsandbytes runs on CPU here; its CUDA kernels' rules are checked against their selection logic
re-written below from the kernel source, not against a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import apply_in_process, load_state
from lora_factors import peft_4bit_view, randomize_lora
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from deltamerge import apply_delta
from deltamerge.errors import DeltaMergeError

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=64)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    return folder


def lora(base: Path, out: Path, dtype: torch.dtype = torch.float16, edit: dict | None = None,
         **config) -> Path:
    """peft's LoRA with random factors, its saved config then changed by ``edit``."""
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, **config))
    randomize_lora(model)
    model.save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | (edit or {})))
    return out


# -- item 2: the LoRA types peft cannot merge are refused, in one line that says why --

@pytest.mark.parametrize(("edit", "words"), [
    ({"alora_invocation_tokens": [5, 6]}, ("aLoRA", "alora_invocation_tokens", "after its invocation")),
    ({"arrow_config": {"top_k": 2, "router_temperature": 1.0}}, ("Arrow", "arrow_config", "routes")),
    ({"use_qalora": True, "qalora_group_size": 16}, ("QALoRA", "use_qalora", "GPTQ")),
], ids=["alora", "arrow", "qalora"])
def test_types_peft_cannot_merge_are_refused(tmp_path: Path, base: Path, edit: dict, words) -> None:
    delta = lora(base, tmp_path / "adapter", target_modules=QV, edit=edit)
    out = tmp_path / "out"
    with pytest.raises(DeltaMergeError) as info:
        apply_delta(base, delta, out)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message, message
    for word in (*words, "adapter_config.json", "peft refuses to merge it too"):
        assert word in message, message
    code, err = apply_in_process(base, delta, out)
    assert code == 2 and "peft refuses to merge it too" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_those_fields_switched_off_merge(tmp_path: Path, base: Path) -> None:
    """The fields as a plain LoRA saves them (empty, false) are no reason to refuse."""
    delta = lora(base, tmp_path / "adapter", target_modules=QV,
                 edit={"alora_invocation_tokens": None, "arrow_config": None, "use_qalora": False})
    assert apply_delta(base, delta, tmp_path / "out").kinds == ["lora"]


# -- item 1's --safe-merge: peft's merge_and_unload(safe_merge=True), bit for bit --

def peft_merge(base: Path, delta: Path, dtype: torch.dtype, safe: bool) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=dtype), delta)
    return model.merge_and_unload(safe_merge=safe).state_dict()


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory, base: Path) -> Path:
    folder = tmp_path_factory.mktemp("llama-bf16")
    LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_safe_merge_is_peft_s_safe_merge(
    tmp_path: Path, base: Path, bf16_base: Path, dtype: torch.dtype, dora: bool
) -> None:
    """Linear layers rounded twice (the product to the weight's dtype, then the sum), the
    embedding's LoRA as it always is; DoRA's safe merge rounds once, as its default does."""
    folder = base if dtype == torch.float16 else bf16_base
    targets = [*QV, "down_proj"] + ([] if dora else ["embed_tokens"])
    delta = lora(folder, tmp_path / "adapter", dtype, target_modules=targets, use_dora=dora)
    safe, default = peft_merge(folder, delta, dtype, True), peft_merge(folder, delta, dtype, False)
    apply_delta(folder, delta, tmp_path / "safe", block_size=700, safe_merge=True)
    apply_delta(folder, delta, tmp_path / "default", block_size=700)
    for out, reference in ((tmp_path / "safe", safe), (tmp_path / "default", default)):
        got = load_state(out)
        assert got and set(got) <= set(reference)
        for name, tensor in got.items():
            assert tensor.dtype == dtype and torch.equal(tensor, reference[name]), (out.name, name)
    differ = [n for n in load_state(tmp_path / "safe") if not torch.equal(safe[n], default[n])]
    assert bool(differ) != dora, differ  # the option matters where peft's two merges differ
    assert all(n.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for n in differ)
    record = json.loads((tmp_path / "safe" / "deltamerge-result.json").read_text())
    assert record["options"]["safe_merge"] is True


def test_safe_merge_refuses_what_peft_refuses(tmp_path: Path, base: Path) -> None:
    """A product that overflows fp16: peft's safe_merge raises; so does --safe-merge, one line."""
    from safetensors.torch import load_file, save_file

    delta = lora(base, tmp_path / "adapter", target_modules=QV)
    weights = delta / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "layers.1.self_attn.v_proj.lora_B" in k)
    state[key] = state[key] * 1e6
    save_file(state, weights)
    with pytest.raises(ValueError, match="NaNs detected"):
        peft_merge(base, delta, torch.float16, True)
    code, err = apply_in_process(base, delta, tmp_path / "out", "--safe-merge")
    assert code == 2 and err.count("\n") == 1, err
    assert "'model.layers.1.self_attn.v_proj.weight': the merged weight is not finite" in err
    assert "safe_merge" in err and not (tmp_path / "out").exists()
    got = load_state(apply_delta(base, delta, tmp_path / "default").out)  # peft's default merges
    assert not torch.isfinite(got["model.layers.1.self_attn.v_proj.weight"]).all()


def test_the_new_options_are_checked(tmp_path: Path, base: Path) -> None:
    delta = lora(base, tmp_path / "adapter", target_modules=QV)
    for option, value, words in (
        ("qlora_scope", "everything", "--qlora-scope must be one of all-linear, targets"),
        ("qlora_kernel", "tpu", "--qlora-kernel must be one of cuda, cpu"),
        ("qlora_scope", "targets", "--qlora-scope says how the base was quantized in training: "
                                   "it needs --qlora"),
        ("qlora_kernel", "cpu", "it needs --qlora"),
        ("safe_merge", "yes", "safe_merge"),
    ):
        with pytest.raises(DeltaMergeError, match=words) as info:
            apply_delta(base, delta, tmp_path / "out", **{option: value})
        assert info.value.exit_code == 2
    code, err = apply_in_process(base, delta, tmp_path / "out", "--qlora-kernel", "cpu")
    assert code == 2 and "needs --qlora" in err
    assert not (tmp_path / "out").exists()


# -- item 4: bitsandbytes' CUDA kernels' rules, against the kernels' logic re-written here --
#
# From bitsandbytes' csrc/kernels.cu (0.50.1's, and main's a week later): kQuantizeBlockwise (8 bits,
# blocks of 256) and kQuantizeBlockwiseSmall (NF4, blocks of 64) scale a block by
# ``x * (1.0f / absmax)``, then pick a code with dQuantize (a binary search) or dQuantizeNF4 (a
# tree of comparisons). The GPU's reciprocal is approximate (the kernels are built with
# --use_fast_math); the correctly rounded one stands in for it here, as in deltamerge.
# Not run on a GPU: no session of this task had one.

NF4_TREE = (0.03979014977812767, 0.3893125355243683, 0.6427869200706482, 0.8614784181118011,
            0.5016634166240692, 0.2035212516784668, 0.2920137718319893, 0.1202552504837513,
            -0.33967943489551544, -0.13791173323988914, -0.045525018125772476,
            -0.23460740596055984, -0.6106329262256622, -0.4599952697753906, -0.8480964004993439)


def d_quantize_nf4(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4's tree, branch for branch (its constants as the compiler rounds them)."""
    t = dict(zip(NF4_TREE, torch.tensor(NF4_TREE, dtype=torch.float32)))

    def pick(c: float, hi, lo):
        return torch.where(x > t[c], torch.as_tensor(hi), torch.as_tensor(lo))

    return pick(0.03979014977812767,
                pick(0.3893125355243683,
                     pick(0.6427869200706482, pick(0.8614784181118011, 15, 14),
                          pick(0.5016634166240692, 13, 12)),
                     pick(0.2035212516784668, pick(0.2920137718319893, 11, 10),
                          pick(0.1202552504837513, 9, 8))),
                pick(-0.33967943489551544,
                     pick(-0.13791173323988914, pick(-0.045525018125772476, 7, 6),
                          pick(-0.23460740596055984, 5, 4)),
                     pick(-0.6106329262256622, pick(-0.4599952697753906, 3, 2),
                          pick(-0.8480964004993439, 1, 0))))


def d_quantize(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: the binary search over the 256 codes and its choice at the end, step for step."""
    def full(v, dtype=torch.int64):
        return torch.full(x.shape, v, dtype=dtype)

    pivot, upper_pivot, lower_pivot = full(127), full(255), full(0)
    lower, upper = full(-1.0, torch.float32), full(1.0, torch.float32)
    val = code[pivot]
    i = 64
    while i > 0:
        right = x > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = torch.where(right, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(x > val, up, down)


def kernel_blocks(a: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's values as the kernel loads them (zeros past the end), scaled by 1.0f / absmax."""
    n = a.numel()
    v = torch.zeros(-(n // -block) * block, dtype=torch.float32)
    v[:n] = a.reshape(-1).float()
    v = v.view(-1, block)
    absmax = v.abs().amax(dim=1)
    one = torch.tensor(1.0, dtype=torch.float32)
    return (v * (one / absmax).view(-1, 1)).view(-1)[:n], absmax


def cuda_quantize_blockwise(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kQuantizeBlockwise<float, 256, 2, 0, General8bit>: codes and absmax."""
    import deltamerge.kinds.nf4 as nf4

    scaled, absmax = kernel_blocks(a, 256)
    return d_quantize(nf4.dynamic_code(), scaled).to(torch.uint8), absmax


def cuda_roundtrip(w: torch.Tensor, dq: bool) -> torch.Tensor:
    """quantize_4bit then dequantize_4bit on a GPU (kQuantizeBlockwiseSmall, kDequantizeBlockwise)."""
    import deltamerge.kinds.nf4 as nf4

    scaled, absmax = kernel_blocks(w, 64)
    q = d_quantize_nf4(scaled)
    if dq:
        offset = absmax.mean()
        q8, absmax2 = cuda_quantize_blockwise(absmax - offset)
        absmax = kernel_dequantize(q8, absmax2) + offset
    vals = nf4.nf4_code()[q]
    n = w.numel()
    out = vals * absmax.repeat_interleave(64)[:n]
    return out.to(w.dtype).view(w.shape)


def kernel_dequantize(q8: torch.Tensor, absmax2: torch.Tensor) -> torch.Tensor:
    import deltamerge.kinds.nf4 as nf4

    return nf4.dynamic_code()[q8.long()] * absmax2.repeat_interleave(256)[: q8.numel()]


def adversarial_8bit() -> torch.Tensor:
    """Values on and an fp32 step either side of every midpoint and code, in blocks whose absmax
    is 1 (so they are what the kernel compares), a block of zeros and a short last block."""
    import deltamerge.kinds.nf4 as nf4

    code = nf4.dynamic_code()
    mids = (code[:-1] + code[1:]) * 0.5
    parts = [torch.rand(256 * 8, generator=torch.Generator().manual_seed(4)) * 2 - 1]
    for centre in (mids, code):
        parts.append(centre)
        for toward in (-2.0, 2.0):
            parts.append(torch.nextafter(centre, torch.full_like(centre, toward)))
    v = torch.cat(parts).clamp(-1, 1)
    v = torch.cat([v, torch.zeros(-v.numel() % 255)]).view(-1, 255)
    x = torch.cat([v, torch.ones(v.shape[0], 1)], dim=1).view(-1)
    return torch.cat([x, torch.zeros(256), x[:100] * 3e-7])


def test_cuda_8bit_codes_are_the_kernel_s() -> None:
    import deltamerge.kinds.nf4 as nf4

    x = adversarial_8bit()
    want, want_absmax = cuda_quantize_blockwise(x)
    got, absmax = nf4.quantize_8bit(x, cuda=True)
    assert torch.equal(absmax, want_absmax) and torch.equal(got, want)
    cpu, _ = nf4.quantize_8bit(x)
    assert not torch.equal(cpu, got)  # the table look-up picks other codes here


def nf4_edge_weights() -> torch.Tensor:
    """Blocks of 64 on and beside NF4's midpoints, zeros, and a short last block, once of zeros
    and once of values whose x / absmax and x * (1 / absmax) round apart."""
    import deltamerge.kinds.nf4 as nf4

    mids = nf4._nf4_bounds()
    ties = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.ones_like(mids)),
                      torch.nextafter(mids, -torch.ones_like(mids)), -mids])
    ties = torch.cat([ties, torch.zeros(128 - ties.numel())])
    return torch.cat([ties, ties * 0.37, torch.zeros(64), torch.linspace(-1, 1, 64) * 1e-3])


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cuda_roundtrip_is_the_kernels(dtype: torch.dtype, dq: bool) -> None:
    import deltamerge.kinds.nf4 as nf4

    g = torch.Generator().manual_seed(5)
    edge = nf4_edge_weights()
    tail = torch.randn(40, generator=g) * 0.02  # a short last block: the GPU multiplies it too
    cases = [
        (torch.randn(300, 256, generator=g) * 0.02).to(dtype),  # 1200 blocks: 5 of 256 scales
        (torch.randn(37, 48, generator=g) * 0.02).to(dtype),  # rows across blocks, a short one
        torch.cat([edge, tail]).to(dtype),
        torch.cat([edge, torch.zeros(40)]).to(dtype),  # a short last block of zeros
    ]
    for w in cases:
        want = cuda_roundtrip(w, dq)
        got = nf4.nf4_roundtrip_tensor(w, dq, cuda=True)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    cpu = nf4.nf4_roundtrip_tensor(cases[3], dq)
    gpu = nf4.nf4_roundtrip_tensor(cases[3], dq, cuda=True)
    # blocks of zeros: code 7 (0.0) on the CPU, code 0 (-1.0) on the GPU, times a zero scale
    # (-0.0), or minus the dequantized scale under double quantization
    assert not torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8))


def test_cuda_rule_with_rows_a_block_at_a_time() -> None:
    import deltamerge.kinds.nf4 as nf4

    w = (torch.randn(333, 64, generator=torch.Generator().manual_seed(6)) * 0.02).half()
    w[40:42] = 0  # two rows of zeros: two whole blocks
    prep = nf4.Nf4Prepare(tuple(w.shape), True, "t", cuda=True)
    for r0 in range(0, 333, 32):
        prep.add(w[r0 : r0 + 32], r0)
    state = prep.finish()
    out = torch.empty_like(w)
    for r0 in range(0, 333, 32):
        nf4.nf4_roundtrip(w[r0 : r0 + 32], state, r0, out=out[r0 : r0 + 32])
    assert torch.equal(out.view(torch.int16), cuda_roundtrip(w, True).view(torch.int16))


# -- item 4: every Linear layer training quantized, against transformers' own 4-bit loading --

ARCHITECTURES = {
    # name: (config, the module the adapter targets, Linear layers per decoder layer); widths
    # are whole blocks of 64, so that bitsandbytes' AVX-512 dequantize (absmax per row) agrees
    # with its own quantization
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=96), "q_proj", 7),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                  vocab_size=96), "o_proj", 7),  # tied embeddings: no lm_head
    "gpt-neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=96),
                 "query_key_value", 4),  # fused layers, biases, embed_in / embed_out
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_base(request, tmp_path_factory) -> tuple[Path, str, int]:
    import transformers

    config_name, fields, target, linear = ARCHITECTURES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(1)
    config = getattr(transformers, config_name)(**fields)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder)
    return folder, target, linear


def auto_lora(base: Path, out: Path, dtype: torch.dtype, target: str) -> Path:
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype),
                           LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    randomize_lora(model)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(("dtype", "dq"), [(torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp16-dq", "bf16"])
def test_every_linear_layer_is_rounded_as_transformers_quantized_it(
    tmp_path: Path, arch_base, monkeypatch, dtype: torch.dtype, dq: bool
) -> None:
    base, target, linear = arch_base
    delta = auto_lora(base, tmp_path / "adapter", dtype, target)
    seen = peft_4bit_view(base, delta, dq, dtype, monkeypatch, untargeted=True)
    out = tmp_path / "out"
    mode = "nf4-dq" if dq else "nf4"
    apply_delta(base, delta, out, block_size=1000, qlora=mode, qlora_dtype=dtype, qlora_kernel="cpu")
    got, original = load_state(out), load_state(base)
    assert set(got) == set(original) and len(seen) == 2 * linear
    assert not any(n.endswith(("lm_head.weight", "embed_out.weight")) for n in seen)
    for name, tensor in got.items():  # the result is in the base's dtype, fp16
        want = (seen[name] if name in seen else original[name]).to(tensor.dtype)
        assert torch.equal(tensor, want), name
    record = json.loads((out / "deltamerge-result.json").read_text())["options"]
    assert (record["qlora"], record["qlora_scope"], record["qlora_kernel"]) == (mode, "all-linear",
                                                                               "cpu")


def test_the_defaults_are_the_gpu_s_rules_on_every_linear_layer(tmp_path: Path, base: Path) -> None:
    """Untargeted layers are the CUDA kernels' round trip; --qlora-scope targets leaves them."""
    delta = lora(base, tmp_path / "adapter", target_modules=["q_proj"])
    apply_delta(base, delta, tmp_path / "out", qlora="nf4-dq")
    apply_delta(base, delta, tmp_path / "targets", qlora="nf4-dq", qlora_scope="targets")
    got, only = (load_state(tmp_path / n) for n in ("out", "targets"))
    original = load_state(base)
    for name, w in original.items():
        if name.endswith("proj.weight") and "q_proj" not in name:
            assert torch.equal(got[name].view(torch.int16), cuda_roundtrip(w, True).view(torch.int16))
            assert torch.equal(only[name], w), name
        elif "q_proj" in name:
            assert torch.equal(got[name], only[name])  # the targets: the same either way
        else:
            assert torch.equal(got[name], w) and torch.equal(only[name], w), name
    record = json.loads((tmp_path / "out" / "deltamerge-result.json").read_text())["options"]
    assert (record["qlora_scope"], record["qlora_kernel"]) == ("all-linear", "cuda")


def test_a_mixture_of_experts_is_refused_under_all_linear(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    base = tmp_path / "mixtral"
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=2,
                           vocab_size=96)
    MixtralForCausalLM(config).to(torch.float16).save_pretrained(base)
    model = get_peft_model(MixtralForCausalLM.from_pretrained(base, dtype=torch.float16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    code, err = apply_in_process(base, tmp_path / "adapter", tmp_path / "out", "--qlora", "nf4")
    assert code == 2 and "mixture of experts" in err and "--qlora-scope targets" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    result = apply_delta(base, tmp_path / "adapter", tmp_path / "out", qlora="nf4",
                         qlora_scope="targets")
    assert result.kinds == ["lora"]
