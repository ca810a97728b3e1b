"""Models that ship their own code (ChatGLM, MOSS, early Falcon, Aquila): the result keeps their
``*.py`` files and config.json's ``auto_map``, so it loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import apply_in_process, assert_states_equal, load_state
from lora_factors import randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from remote_code import AUTO_MAP, CODE, load_tiny_glm, write_tiny_glm

from deltamerge import apply_delta, make_delta

IDS = torch.tensor([[1, 5, 9, 42, 3, 17]])


@pytest.fixture(autouse=True)
def modules_cache(hf_modules_cache):
    """trust_remote_code copies the model's code into a cache of the tests' own."""


def assert_code_carried(out: Path) -> None:
    for name, text in CODE.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_additive_delta_keeps_the_model_s_code(tmp_path: Path) -> None:
    base = write_tiny_glm(tmp_path / "moss-base", seed=0)
    target = write_tiny_glm(tmp_path / "moss-sft", seed=1)
    make_delta(base, target, tmp_path / "delta")
    assert_code_carried(tmp_path / "delta")  # the publisher's delta carries it too
    apply_delta(base, tmp_path / "delta", tmp_path / "moss")
    assert_code_carried(tmp_path / "moss")
    expected = {n: b + load_state(tmp_path / "delta")[n] for n, b in load_state(base).items()}
    assert_states_equal(load_state(tmp_path / "moss"), expected)
    merged = load_tiny_glm(tmp_path / "moss")
    assert_states_equal(merged.state_dict(), expected)
    with torch.no_grad():
        assert torch.equal(merged(IDS), load_tiny_glm(tmp_path / "moss")(IDS))
        assert not torch.equal(merged(IDS), load_tiny_glm(base)(IDS))


def test_lora_on_remote_code_is_peft_s_merge(tmp_path: Path) -> None:
    base = write_tiny_glm(tmp_path / "chatglm", seed=0)
    model = get_peft_model(load_tiny_glm(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "dense"]))
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    assert not any(p.suffix == ".py" for p in (tmp_path / "adapter").iterdir())
    reference = PeftModel.from_pretrained(load_tiny_glm(base), tmp_path / "adapter").merge_and_unload()
    apply_delta(base, tmp_path / "adapter", tmp_path / "out")
    assert_code_carried(tmp_path / "out")  # from the base: the adapter has none
    merged = load_tiny_glm(tmp_path / "out")
    assert_states_equal(merged.state_dict(), reference.state_dict())
    with torch.no_grad():
        assert torch.equal(merged(IDS), reference(IDS))


def test_code_leading_out_of_its_folder_is_refused(tmp_path: Path) -> None:
    base = write_tiny_glm(tmp_path / "base", seed=0)
    outside = tmp_path / "elsewhere.py"
    outside.write_text("print('not the model')\n")
    os.symlink(outside, base / "quantization.py")
    delta = write_tiny_glm(tmp_path / "delta", seed=1)  # (BASE as its own DELTA is refused first)
    code, err = apply_in_process(base, delta, tmp_path / "out", "--kind", "add")
    assert code == 2
    assert "quantization.py" in err and "outside the folder" in err
    assert not (tmp_path / "out").exists()


def test_code_linked_inside_its_folder_travels(tmp_path: Path) -> None:
    base = write_tiny_glm(tmp_path / "base", seed=0)
    (base / "code").mkdir()
    (base / "code" / "helpers.py").write_text("X = 1\n")
    os.symlink("code/helpers.py", base / "helpers.py")
    make_delta(base, base, tmp_path / "zero")
    apply_delta(base, tmp_path / "zero", tmp_path / "out")
    assert (tmp_path / "out" / "helpers.py").read_text() == "X = 1\n"
    assert not (tmp_path / "out" / "helpers.py").is_symlink()
    assert not (tmp_path / "out" / "code").exists()  # the top level only
