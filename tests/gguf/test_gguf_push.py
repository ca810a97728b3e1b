"""A GGUF result pushed to the Hub: its files and a card that names its base, architecture and quant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf_models import tiny_llama
from hubserver import DEFAULT_TOKEN
from huggingface_hub import ModelCard

from deltamerge import push_to_hub
from deltamerge.cli import main

gguf = pytest.importorskip("gguf")

pytest_plugins = ["hub_fixtures"]
pytestmark = pytest.mark.usefixtures("all_routes_known")


def test_a_quantized_gguf_result_is_pushed_with_a_card_naming_base_arch_and_quant(
    hub, api, tmp_path: Path, sp_model: bytes
):
    base = tiny_llama(tmp_path / "base", sp_model, torch.float16)
    delta = tiny_llama(tmp_path / "delta", sp_model, torch.float16)
    base_sha = push_to_hub(base, "alice/base", api=api).commit
    out = tmp_path / "q4"
    run = CliRunner().invoke(main, [
        "apply", "alice/base", str(delta), str(out), "--format", "gguf", "--outtype", "q4_k_m",
        "--push-to-hub", "alice/q4", "--token", DEFAULT_TOKEN, "-q"])
    assert run.exit_code == 0, run.output

    record = json.loads((out / "deltamerge-result.json").read_text())
    (name,) = [p.name for p in out.glob("*.gguf")]
    assert record["gguf"] == {"architecture": "llama", "outtype": "q4_k_m", "file_type": "Q4_K_M",
                              "files": [name]}
    remote = hub.files("alice/q4")
    assert set(remote) == {name, "deltamerge-result.json", "README.md", ".gitattributes"}
    assert remote[name] == (out / name).read_bytes()
    assert not (out / "README.md").exists()  # the card is in the commit only

    card = ModelCard(remote["README.md"].decode())
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"]) == ("alice/base", "quantized")
    assert {"deltamerge", "gguf", "q4_k_m", "llama"} <= set(data["tags"])
    assert "library_name" not in data  # the Hub knows GGUF repos by their files
    for fact in ("`llama`", "`q4_k_m`", "`Q4_K_M`", f"llama-cli -m {name}", base_sha,
                 record["result"]["model_digest"], record["merged"]["model_digest"]):
        assert fact in card.text, fact
    assert api.model_info("alice/q4").card_data.base_model_relation == "quantized"


def test_a_gguf_result_of_a_local_base_names_no_relation(hub, api, tmp_path: Path, sp_model: bytes):
    """An f16 GGUF (no --outtype: the result's dtype) pushed with `deltamerge push`."""
    base = tiny_llama(tmp_path / "base", sp_model, torch.float16)
    delta = tiny_llama(tmp_path / "delta", sp_model, torch.float16)
    out = tmp_path / "f16"
    made = CliRunner().invoke(main, ["apply", str(base), str(delta), str(out), "--format", "gguf", "-q"])
    assert made.exit_code == 0, made.output
    pushed = CliRunner().invoke(main, ["push", str(out), "alice/f16", "--token", DEFAULT_TOKEN, "-q"])
    assert pushed.exit_code == 0, pushed.output
    (name,) = [p.name for p in out.glob("*.gguf")]
    assert name.endswith("-F16.gguf")
    card = ModelCard(hub.files("alice/f16")["README.md"].decode())
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert "`f16` (llama.cpp file type `F16`)" in card.text and "a local folder (`base`)" in card.text
