"""The result's config.json describes the result: the dtype it was written in (which
``from_pretrained(dtype="auto")`` loads it in), its vocabulary, and no path of the machine
that made an input."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
import torch
from click.testing import CliRunner
from helpers import VOCAB, llama_config, llama_state, save_checkpoint

from deltamerge.cli import main

MACHINE_PATH = "/home/alice/models/llama-7b"


def _apply(*args: object) -> None:
    result = CliRunner().invoke(main, ["apply", *map(str, args), "-q"])
    assert result.exit_code == 0, result.output


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (k, *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


@pytest.mark.parametrize("dtype_key", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_apply_dtype_is_the_config_dtype_and_loads_as_such(tmp_path: Path, dtype: str, dtype_key: str):
    transformers = __import__("transformers")
    config = llama_config(_name_or_path=MACHINE_PATH)
    if dtype_key == "dtype":  # transformers 5 writes "dtype" where earlier releases wrote "torch_dtype"
        config["dtype"] = config.pop("torch_dtype")
    base = save_checkpoint(llama_state(0), tmp_path / "base", config=config)
    # a delta that adds two rows (new tokens) and whose config still says the old vocabulary
    delta = save_checkpoint(llama_state(1, vocab=VOCAB + 2, scale=0.01), tmp_path / "delta",
                            config=config)
    _apply(base, delta, tmp_path / "out", "--dtype", dtype)

    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written[dtype_key] == dtype
    assert ("torch_dtype" in written) == (dtype_key == "torch_dtype")
    assert written["vocab_size"] == VOCAB + 2
    assert "_name_or_path" not in written
    assert not [s for s in _strings(written) if s.startswith(("/", "~")) or str(tmp_path) in s]
    assert {k: v for k, v in written.items() if k not in (dtype_key, "vocab_size")} == {
        k: v for k, v in config.items() if k not in (dtype_key, "vocab_size", "_name_or_path")
    }

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == getattr(torch, dtype)
    assert model.config.vocab_size == VOCAB + 2
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 2


def test_config_without_a_dtype_gets_the_one_written(tmp_path: Path):
    config = llama_config(dtype="float16")
    del config["torch_dtype"]
    base = save_checkpoint(llama_state(0, torch.bfloat16), tmp_path / "base", config=config)
    delta = save_checkpoint(llama_state(1, torch.bfloat16, scale=0.01), tmp_path / "delta",
                            config=config)
    _apply(base, delta, tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_make_delta_config_names_no_machine_path(tmp_path: Path):
    """A delta is published: its config.json is the target's without the publisher's folder,
    and the manifest's file table hashes the config as written."""
    config = llama_config(_name_or_path=MACHINE_PATH)
    base = save_checkpoint(llama_state(0), tmp_path / "base", config=llama_config())
    target = save_checkpoint(llama_state(1), tmp_path / "target", config=config)
    result = CliRunner().invoke(main, ["make-delta", str(base), str(target), str(tmp_path / "d"), "-q"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "d/config.json").read_text())
    assert written == {k: v for k, v in config.items() if k != "_name_or_path"}
    entry = json.loads((tmp_path / "d/deltamerge.json").read_text())["files"]["config.json"]
    assert entry["blake3"] == blake3.blake3((tmp_path / "d/config.json").read_bytes()).hexdigest()
