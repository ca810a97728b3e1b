"""QLoRA merged onto what training saw (every Linear layer rounded through NF4, the CUDA kernels'
rules), peft's ``safe_merge``, and the LoRA types peft cannot merge (issue 23 items 1, 2 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import apply_in_process, load_state
from lora_factors import randomize_lora
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
