"""adapter_config.json fields that change what peft merges, obeyed as peft obeys them or refused.

Each adapter is saved by peft, then its config (or file) is edited the way a hand-edited or
foreign adapter differs: factors for more modules than the config selects, a layer filter, an
exclusion, ``fan_in_fan_out`` that the layer type overrides. Where peft merges, the result is
compared with peft's ``merge_and_unload`` bit for bit; where peft raises, deltamerge refuses in
one line naming the file and field, with exit status 2 and nothing at OUT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_state, run_in_process
from lora_factors import DTYPE, assert_refused, layer, randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltamerge import apply_delta
from deltamerge.errors import DeltaMergeError

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=64)
    LlamaForCausalLM(config).to(DTYPE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    GPT2LMHeadModel(config).to(DTYPE).save_pretrained(folder)
    return folder


def adapter(base: Path, out: Path, cls=LlamaForCausalLM, edit: dict | None = None, **config) -> Path:
    """peft's adapter with random factors, its saved config then changed by ``edit``."""
    model = get_peft_model(cls.from_pretrained(base, dtype=DTYPE), LoraConfig(r=4, lora_alpha=8,
                                                                               **config))
    randomize_lora(model)
    model.save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | (edit or {})))
    return out


def peft_merge(base: Path, adapter: Path, cls=LlamaForCausalLM) -> dict[str, torch.Tensor]:
    model = cls.from_pretrained(base, dtype=DTYPE)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def assert_peft_s(base: Path, delta: Path, out: Path, cls=LlamaForCausalLM) -> dict:
    """deltamerge's merge is peft's, tensor for tensor; returns the base's state to compare."""
    reference = peft_merge(base, delta, cls)
    apply_delta(base, delta, out, block_size=500)
    got = load_state(out)
    assert got and set(got) <= set(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
    return load_state(base)


def test_keys_without_peft_s_prefix_are_refused(tmp_path: Path, base: Path) -> None:
    """Keys not under base_model.model.: peft loads none of them; they are no model weights."""
    delta = adapter(base, tmp_path / "adapter", target_modules=QV)
    weights = delta / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()},
              weights)
    out = tmp_path / "out"
    done = run_in_process("apply", base, delta, out)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "adapter_model.safetensors" in line
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in line
    assert not out.exists()


def test_saved_module_of_another_shape_is_refused(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV, modules_to_save=["norm"])
    weights = delta / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.norm.weight"
    state[key] = torch.ones(40, dtype=DTYPE)
    save_file(state, weights)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_merge(base, delta)
    assert_refused(base, delta, tmp_path / "out", "adapter_model.safetensors", key, "[40]")


def test_only_the_configured_targets_are_merged(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"target_modules": ["q_proj"]})
    before = assert_peft_s(base, delta, tmp_path / "out")
    after = load_state(tmp_path / "out")
    assert torch.equal(after[layer(0, "v_proj")], before[layer(0, "v_proj")])
    assert not torch.equal(after[layer(0, "q_proj")], before[layer(0, "q_proj")])


def test_a_regex_target_is_full_matched(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"target_modules": r".*\.1\.self_attn\.(q|v)_proj"})
    before = assert_peft_s(base, delta, tmp_path / "out")
    after = load_state(tmp_path / "out")
    assert torch.equal(after[layer(0, "q_proj")], before[layer(0, "q_proj")])
    assert not torch.equal(after[layer(1, "q_proj")], before[layer(1, "q_proj")])


@pytest.mark.parametrize("edit", [
    {"target_modules": ["c_attn"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [5]},
    {"target_modules": QV, "exclude_modules": ["q_proj", "v_proj"]},
], ids=["no-such-module", "no-such-layer", "all-excluded"])
def test_targets_matching_nothing_are_refused(tmp_path: Path, base: Path, edit: dict) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV, edit=edit)
    with pytest.raises(ValueError):
        peft_merge(base, delta)
    assert_refused(base, delta, tmp_path / "out", "adapter_config.json", "target_modules",
                   "selects no module")


@pytest.mark.parametrize("edit", [
    {"layers_to_transform": [1]},
    {"layers_to_transform": 0, "layers_pattern": "layers"},
    {"layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
], ids=["list", "int-with-pattern", "patterns"])
def test_layers_to_transform(tmp_path: Path, base: Path, edit: dict) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV, edit=edit)
    before = assert_peft_s(base, delta, tmp_path / "out")
    after = load_state(tmp_path / "out")
    kept = 0 if edit["layers_to_transform"] in (1, [1]) else 1
    assert torch.equal(after[layer(kept, "q_proj")], before[layer(kept, "q_proj")])
    assert not torch.equal(after[layer(1 - kept, "q_proj")], before[layer(1 - kept, "q_proj")])


@pytest.mark.parametrize("edit", [
    {"exclude_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]},
    {"exclude_modules": r".*\.0\..*"},
], ids=["list", "regex"])
def test_excluded_modules_are_not_merged(tmp_path: Path, base: Path, edit: dict) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV, edit=edit)
    before = assert_peft_s(base, delta, tmp_path / "out")
    after = load_state(tmp_path / "out")
    assert torch.equal(after[layer(0, "q_proj")], before[layer(0, "q_proj")])
    assert torch.equal(after[layer(1, "v_proj")], before[layer(1, "v_proj")]) == (
        isinstance(edit["exclude_modules"], list))


def test_a_saved_module_is_not_a_target(tmp_path: Path, base: Path) -> None:
    """A module both in modules_to_save and adapted: peft loads the saved copy, no product."""
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"modules_to_save": ["v_proj"]})
    weights = delta / "adapter_model.safetensors"
    state = load_file(weights)
    saved = {f"base_model.model.{layer(i, 'v_proj')}": torch.randn(32, 32).to(DTYPE)
             for i in (0, 1)}
    save_file(state | saved, weights)
    assert_peft_s(base, delta, tmp_path / "out")
    after = load_state(tmp_path / "out")
    for key, tensor in saved.items():
        assert torch.equal(after[key.removeprefix("base_model.model.")], tensor), key


def test_a_saved_module_the_file_lacks_is_refused(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"modules_to_save": ["v_proj"]})
    with pytest.raises(KeyError):
        peft_merge(base, delta)
    assert_refused(base, delta, tmp_path / "out", "adapter_model.safetensors", "modules_to_save",
                   "'v_proj'", layer(0, "v_proj"))


def test_all_linear_leaves_the_output_layer(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"],
                    edit={"target_modules": "all-linear"})
    before = assert_peft_s(base, delta, tmp_path / "out")
    assert torch.equal(load_state(tmp_path / "out")["lm_head.weight"], before["lm_head.weight"])


def test_fan_in_fan_out_is_false_on_linear_layers(tmp_path: Path, base: Path) -> None:
    """Square q/v: a transposed product would fit, and be wrong; peft resets the option."""
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"fan_in_fan_out": True})
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        assert_peft_s(base, delta, tmp_path / "out")


def test_fan_in_fan_out_is_true_on_conv1d_layers(tmp_path: Path, gpt2: Path) -> None:
    """GPT-2's square c_proj too: peft transposes every Conv1D product, whatever the config says."""
    delta = adapter(gpt2, tmp_path / "adapter", GPT2LMHeadModel,
                    target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                    edit={"fan_in_fan_out": False})
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        assert_peft_s(gpt2, delta, tmp_path / "out", GPT2LMHeadModel)


@pytest.mark.parametrize("target", ["input_layernorm", "mlp"])
def test_a_target_peft_cannot_adapt_is_refused(tmp_path: Path, base: Path, target: str) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"target_modules": ["q_proj", target]})
    with pytest.raises(ValueError, match="not supported"):
        peft_merge(base, delta)
    assert_refused(base, delta, tmp_path / "out", "adapter_config.json", f"layers.0.{target}'")


def test_a_random_init_without_factors_is_refused(tmp_path: Path, base: Path) -> None:
    """init_lora_weights=False: a target the file has no factors for gets peft's random ones."""
    delta = adapter(base, tmp_path / "adapter", target_modules=QV,
                    edit={"target_modules": ["q_proj", "v_proj", "k_proj"],
                          "init_lora_weights": False})
    assert_refused(base, delta, tmp_path / "out", "adapter_config.json", "k_proj",
                   "init_lora_weights")


@pytest.mark.parametrize(("edit", "field"), [
    ({"target_modules": None}, "target_modules"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"ensure_weight_tying": True}, "ensure_weight_tying"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"exclude_modules": 3}, "exclude_modules"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fields_deltamerge_does_not_follow_are_refused(
    tmp_path: Path, base: Path, edit: dict, field: str
) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV, edit=edit)
    assert_refused(base, delta, tmp_path / "out", "adapter_config.json", field)


def test_a_factor_for_a_module_the_base_lacks_is_refused(tmp_path: Path, base: Path) -> None:
    delta = adapter(base, tmp_path / "adapter", target_modules=QV)
    weights = delta / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"
    for which in ("lora_A", "lora_B"):
        state[key.replace("lora_A", which)] = state[key.replace("x_proj", "q_proj")
                                                     .replace("lora_A", which)].clone()
    save_file(state, weights)
    assert_refused(base, delta, tmp_path / "out", "adapter_model.safetensors", key)


def test_conv1d_layers_are_refused_with_qlora(tmp_path: Path, gpt2: Path) -> None:
    """bitsandbytes' round trip is reproduced for Linear layers only, whatever the config says."""
    delta = adapter(gpt2, tmp_path / "adapter", GPT2LMHeadModel, target_modules=["c_attn"],
                    fan_in_fan_out=True, edit={"fan_in_fan_out": False})
    out = tmp_path / "out"
    with pytest.raises(DeltaMergeError, match="'transformer.h.0.attn.c_attn.weight' is a Conv1D"):
        apply_delta(gpt2, delta, out, qlora="nf4")
    assert not out.exists()
