"""QLoRA merged onto what training saw (every Linear layer rounded through NF4, the CUDA kernels'
rules), peft's ``safe_merge``, and the LoRA types peft cannot merge (issue 23 items 1, 2 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import apply_in_process
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
