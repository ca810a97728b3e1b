"""IA3, LoHa, LoKr and VeRA configs select their modules as peft does (``kinds/peft_targets.py``).

Each adapter is saved by peft for q_proj and v_proj, then its config is edited: a narrower
``target_modules``, ``exclude_modules``, ``layers_to_transform``. Where peft merges, the result is
peft's ``merge_and_unload`` bit for bit (factors of unselected modules dropped, a field the type's
config class lacks ignored); where peft raises, deltamerge refuses in one line (exit 2, no OUT).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_state
from lora_factors import (
    DTYPE,
    _edit_config,
    assert_matches,
    assert_refused,
    layer,
    make,
    peft_merge,
    tiny_llama,
)
from peft import IA3Config, LoHaConfig, LoKrConfig, VeraConfig

from deltamerge import apply_delta

QV = ["q_proj", "v_proj"]
CONFIGS = {
    "ia3": lambda: IA3Config(target_modules=QV, feedforward_modules=[]),
    "loha": lambda: LoHaConfig(r=2, alpha=4, target_modules=QV),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, target_modules=QV, decompose_both=True),
    "vera": lambda: VeraConfig(r=4, target_modules=QV),
}
# The fields each type's config class has: peft drops the others as unexpected keys.
IGNORED = {("ia3", "layers_to_transform"), ("vera", "exclude_modules")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"), DTYPE)


def edited(base: Path, folder: Path, which: str, change: dict) -> Path:
    adapter = make(base, DTYPE, CONFIGS[which](), folder / "adapter")
    _edit_config(adapter, change)
    return adapter


def merged_as_peft(base: Path, adapter: Path, out: Path) -> tuple[dict, dict]:
    reference = peft_merge(base, DTYPE, [adapter])
    apply_delta(base, adapter, out, block_size=500)
    assert_matches(out, reference)
    return load_state(base), load_state(out)


def changed(before: dict, after: dict, i: int, module: str) -> bool:
    return not torch.equal(before[layer(i, module)], after[layer(i, module)])


@pytest.mark.parametrize("which", list(CONFIGS))
def test_narrower_target_modules(tmp_path: Path, base: Path, which: str) -> None:
    adapter = edited(base, tmp_path, which, {"target_modules": ["q_proj"]})
    before, after = merged_as_peft(base, adapter, tmp_path / "out")
    assert changed(before, after, 0, "q_proj") and not changed(before, after, 0, "v_proj")


@pytest.mark.parametrize(("field", "value"), [("exclude_modules", r".*\.0\..*"),
                                             ("layers_to_transform", [1])],
                         ids=["exclude_modules", "layers_to_transform"])
def test_layer_filters(tmp_path: Path, base: Path, field: str, value: object) -> None:
    """Layer 0 left out by the types whose config class has the field; IA3 has no
    layers_to_transform, VeRA no exclude_modules: peft ignores them there, and so does this."""
    for which in CONFIGS:
        adapter = edited(base, tmp_path / which, which, {field: value})
        before, after = merged_as_peft(base, adapter, tmp_path / which / "out")
        assert changed(before, after, 1, "v_proj"), which
        assert changed(before, after, 0, "v_proj") == ((which, field) in IGNORED), which


@pytest.mark.parametrize("which", list(CONFIGS))
def test_selecting_nothing_is_refused(tmp_path: Path, base: Path, which: str) -> None:
    adapter = edited(base, tmp_path, which, {"target_modules": ["c_attn"]})
    with pytest.raises(ValueError):
        peft_merge(base, DTYPE, [adapter])
    assert_refused(base, adapter, tmp_path / "out", "adapter_config.json", "selects no module")


@pytest.mark.parametrize(("which", "init"), [("ia3", "init_ia3_weights"), ("loha", "init_weights"),
                                             ("lokr", "init_weights"), ("vera", "init_weights")])
def test_a_target_without_factors(tmp_path: Path, base: Path, which: str, init: str) -> None:
    """k_proj selected, no parameters for it in the file: the default init leaves it as it is
    (peft's merge); init false gives it random ones in peft: refused."""
    adapter = edited(base, tmp_path, which, {"target_modules": [*QV, "k_proj"]})
    before, after = merged_as_peft(base, adapter, tmp_path / "out")
    assert changed(before, after, 0, "q_proj") and not changed(before, after, 0, "k_proj")
    _edit_config(adapter, {init: False})
    assert_refused(base, adapter, tmp_path / "out2", "adapter_config.json", "k_proj", init)


@pytest.mark.parametrize("which", list(CONFIGS))
def test_a_target_peft_cannot_adapt_is_refused(tmp_path: Path, base: Path, which: str) -> None:
    adapter = edited(base, tmp_path, which, {"target_modules": [*QV, "input_layernorm"]})
    with pytest.raises((ValueError, TypeError)):
        peft_merge(base, DTYPE, [adapter])
    assert_refused(base, adapter, tmp_path / "out", "adapter_config.json", "input_layernorm'")


@pytest.mark.parametrize("change", [{"feedforward_modules": ["v_proj"]},
                                    {"feedforward_modules": ["up_proj"]}],
                         ids=["shape-disagrees", "not-a-target"])
def test_ia3_feedforward_modules_are_obeyed(tmp_path: Path, base: Path, change: dict) -> None:
    """v_proj's vector is [out, 1]: a config calling it feedforward makes peft's [1, in]."""
    adapter = edited(base, tmp_path, "ia3", change)
    with pytest.raises((RuntimeError, ValueError)):
        peft_merge(base, DTYPE, [adapter])
    assert_refused(base, adapter, tmp_path / "out", "feedforward_modules")


def test_vera_shared_factors_sized_by_the_selection(tmp_path: Path, base: Path) -> None:
    """vera_A/vera_B saved for down_proj's widths: narrowed to q_proj, peft makes them smaller."""
    adapter = make(base, DTYPE, VeraConfig(r=4, target_modules=["q_proj", "down_proj"]),
                   tmp_path / "adapter")
    _edit_config(adapter, {"target_modules": ["q_proj"]})
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_merge(base, DTYPE, [adapter])
    assert_refused(base, adapter, tmp_path / "out", "vera_A")


@pytest.mark.parametrize("which", ["ia3", "vera"])
def test_fan_in_fan_out_follows_the_layer(tmp_path: Path, base: Path, which: str) -> None:
    """Square q/v Linear layers: transposed would fit, and be wrong; peft resets the option."""
    adapter = edited(base, tmp_path, which, {"fan_in_fan_out": True})
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        merged_as_peft(base, adapter, tmp_path / "out")


@pytest.mark.parametrize("change", [{"decompose_both": False}, {"decompose_factor": 4}],
                         ids=["decompose_both", "decompose_factor"])
def test_lokr_layout_other_than_peft_s_is_refused(tmp_path: Path, base: Path, change: dict) -> None:
    """peft makes other parameters than the file's: it would load none of them into those."""
    adapter = edited(base, tmp_path, "lokr", change)
    assert_refused(base, adapter, tmp_path / "out", "adapter_model.safetensors", "peft makes")


def test_vera_rank_other_than_the_config_s_is_refused(tmp_path: Path, base: Path) -> None:
    adapter = edited(base, tmp_path, "vera", {"r": 8})
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_merge(base, DTYPE, [adapter])
    assert_refused(base, adapter, tmp_path / "out", "vera_A", "r is 8")
