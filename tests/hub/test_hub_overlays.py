"""From the Hub: PandaGPT's lone pytorch_model.pt is its weights, and a model's own code travels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import assert_states_equal, load_state
from hubserver import DEFAULT_TOKEN, HubServer
from huggingface_hub import HfApi
from pandagpt import make_panda

from deltamerge import apply_delta, push_to_hub

pytest_plugins = ["hub_fixtures"]


@pytest.fixture(scope="module")
def panda(tmp_path_factory) -> dict[str, Path]:
    return make_panda(tmp_path_factory.mktemp("panda"))


def test_pandagpt_chain_from_the_hub(hub: HubServer, panda, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
    llama = tmp_path / "llama"
    shutil.copytree(panda["llama"], llama)
    (llama / "modeling_custom.py").write_text("CUSTOM = True\n")
    for folder, repo in ((llama, "meta/llama"), (panda["delta"], "lmsys/vicuna-delta-v0"),
                         (panda["panda"], "openllmplayground/pandagpt")):
        push_to_hub(folder, repo, api=api)
    hub.log.clear()
    apply_delta("meta/llama", ["lmsys/vicuna-delta-v0", "openllmplayground/pandagpt"],
                tmp_path / "out", lora_alpha=16, hub={"api": api})
    apply_delta(llama, [panda["delta"], panda["panda"]], tmp_path / "local", lora_alpha=16)
    assert_states_equal(load_state(tmp_path / "out"), load_state(tmp_path / "local"))
    assert "llama_proj.weight" in load_state(tmp_path / "out")
    assert (tmp_path / "out" / "modeling_custom.py").read_text() == "CUSTOM = True\n"
    assert any("pytorch_model.pt" in str(e) for e in hub.log)
    hub.assert_clean()
