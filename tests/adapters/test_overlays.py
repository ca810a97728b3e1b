"""Deltas that bring whole tensors: PandaGPT's LoRA state dict (with its own llama_proj) on top of
Vicuna v0, and ChatGLM's P-tuning v2 prefix encoders, each rebuilt into one loadable folder.

The files are made as the projects make them: PandaGPT's ``agent.save_model`` saves the trainable
``named_parameters()`` of its ``OpenLLAMAPEFTModel`` (a peft LoRA of Vicuna under ``llama_model.``
and a ``llama_proj`` Linear from ImageBind's 1024 features) to ``pytorch_model.pt``; ChatGLM's
``ptuning/main.py`` trains with ``config.pre_seq_len`` set and saves only the prefix encoder to
``pytorch_model.bin``. The references are what their own loading code does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import apply_in_process, assert_states_equal, load_state, run_in_process
from pandagpt import IMAGEBIND, VICUNA_V0_VOCAB, make_panda, panda_reference
from remote_code import load_tiny_glm, write_tiny_glm
from transformers import LlamaForCausalLM

from deltamerge import apply_delta
from deltamerge.errors import MismatchError


@pytest.fixture(scope="module")
def panda(tmp_path_factory) -> dict[str, Path]:
    return make_panda(tmp_path_factory.mktemp("panda"))


def test_pandagpt_is_one_command(tmp_path: Path, panda) -> None:
    keys = list(torch.load(panda["panda"] / "pytorch_model.pt", weights_only=True))
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    out = tmp_path / "pandagpt"
    done = run_in_process("apply", panda["llama"], panda["delta"], panda["panda"], out,
                          "--lora-alpha", "16", "--lora-r", "8")
    assert done.returncode == 0, done.stderr
    assert "(kind: add, lora)" in done.stdout
    got, reference = load_state(out), panda_reference(panda)
    assert sorted(got) == sorted([*load_state(panda["vicuna"]), "llama_proj.weight",
                                  "llama_proj.bias"])
    for name, tensor in got.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(tensor, reference[name]), name
    assert got["llama_proj.weight"].shape == (64, IMAGEBIND)
    # The language model loads as it is, llama_proj aside.
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert model.config.vocab_size == VICUNA_V0_VOCAB


@pytest.mark.parametrize("prefix", ["llama_model.", "llama_model.base_model.model."])
def test_pandagpt_prefix_given(tmp_path: Path, panda, prefix: str) -> None:
    apply_delta(panda["vicuna"], panda["panda"], tmp_path / "out", lora_alpha=16,
                lora_prefix=prefix)
    reference = panda_reference(panda)
    got = load_state(tmp_path / "out")
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name


def test_a_wrong_prefix_is_refused(tmp_path: Path, panda) -> None:
    with pytest.raises(MismatchError, match="no tensor name starts with --lora-prefix"):
        apply_delta(panda["vicuna"], panda["panda"], tmp_path / "out", lora_alpha=16,
                    lora_prefix="visual_encoder.")
    with pytest.raises(MismatchError, match="LoRA module 'llama_model.base_model.*has no tensor"):
        apply_delta(panda["vicuna"], panda["panda"], tmp_path / "out", lora_alpha=16,
                    lora_prefix="")
    assert not (tmp_path / "out").exists()


def test_a_state_dict_needs_its_alpha(tmp_path: Path, panda) -> None:
    code, err = apply_in_process(panda["vicuna"], panda["panda"], tmp_path / "out")
    assert code == 2
    assert "pytorch_model.pt" in err and "--lora-alpha" in err and "adapter_config.json" in err
    assert not (tmp_path / "out").exists()


def test_the_rank_given_is_checked(tmp_path: Path, panda) -> None:
    with pytest.raises(MismatchError, match="has rank 8 but --lora-r says 32"):
        apply_delta(panda["vicuna"], panda["panda"], tmp_path / "out", lora_alpha=32, lora_r=32)


def test_lora_options_without_a_state_dict_are_refused(tmp_path: Path, panda) -> None:
    code, err = apply_in_process(panda["llama"], panda["delta"], tmp_path / "out",
                                 "--lora-alpha", "32")
    assert code == 2 and "--lora-alpha describes a LoRA state dict" in err


@pytest.fixture(autouse=True)
def modules_cache(hf_modules_cache):
    """trust_remote_code copies the model's code into a cache of the tests' own."""


def ptuning_checkpoint(base: Path, out: Path, pre_seq_len: int, projection: bool) -> Path:
    """ChatGLM's ptuning/main.py: base loaded with pre_seq_len, .half(), prefix encoder .float(),
    trained (here: randomised), then the parameters that require grad saved as pytorch_model.bin."""
    model = load_tiny_glm(base, pre_seq_len=pre_seq_len, prefix_projection=projection).half()
    model.transformer.prefix_encoder.float()
    for name, p in model.named_parameters():  # the modeling file's freeze: transformers 5's
        p.requires_grad = ".prefix_encoder." in name  # loading makes the parameters anew
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.transformer.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    state = model.state_dict()
    trained = {k: state[k] for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(k.startswith("transformer.prefix_encoder.") for k in trained)
    out.mkdir()
    torch.save(trained, out / "pytorch_model.bin")
    model.config.save_pretrained(out)
    torch.save({"learning_rate": 2e-2}, out / "training_args.bin")  # the Trainer's, not weights
    return out


@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_checkpoint_becomes_one_folder(tmp_path: Path, projection: bool) -> None:
    base = write_tiny_glm(tmp_path / "chatglm-6b", seed=0)
    ckpt = ptuning_checkpoint(base, tmp_path / "ptuning", 5, projection)
    out = tmp_path / "chatglm-ptuned"
    done = run_in_process("apply", base, ckpt, out)
    assert done.returncode == 0, done.stderr
    assert "(kind: prefix)" in done.stdout

    got, trained = load_state(out), torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert_states_equal(got, {**load_state(base), **trained})
    assert got["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    config = json.loads((out / "config.json").read_text())
    assert config["pre_seq_len"] == 5 and config["prefix_projection"] is projection
    assert config["auto_map"]["AutoModel"] == "modeling_tinyglm.TinyGLMForCausalLM"

    # The folder loads as one model, with exactly those weights...
    from transformers import AutoModel

    merged, info = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_states_equal(merged.state_dict(), {k: v.float() for k, v in got.items()})
    # ...and, set up as ptuning/web_demo.py sets up the base plus the checkpoint (load, load the
    # prefix state dict, .half(), prefix encoder .float()), it is that model: same logits.
    reference = load_tiny_glm(base, torch.float32, pre_seq_len=5, prefix_projection=projection)
    reference.transformer.prefix_encoder.load_state_dict(
        {k.removeprefix("transformer.prefix_encoder."): v for k, v in trained.items()})
    for model in (reference, merged):
        model.half().transformer.prefix_encoder.float()
    assert_states_equal(merged.state_dict(), reference.state_dict())
    ids = torch.tensor([[1, 5, 9, 42, 3]])
    with torch.no_grad():
        assert torch.equal(merged(ids), reference(ids))


def test_a_new_prefix_encoder_replaces_the_old(tmp_path: Path) -> None:
    """P-tuning a P-tuned folder again, without the projection: the old MLP must go."""
    base = write_tiny_glm(tmp_path / "chatglm-6b", seed=0)
    first = ptuning_checkpoint(base, tmp_path / "first", 5, True)
    apply_delta(base, first, tmp_path / "tuned")
    second = ptuning_checkpoint(base, tmp_path / "second", 3, False)
    apply_delta(tmp_path / "tuned", second, tmp_path / "retuned")
    got = load_state(tmp_path / "retuned")
    assert not any(".prefix_encoder.trans." in k for k in got)
    assert got["transformer.prefix_encoder.embedding.weight"].shape[0] == 3
    config = json.loads((tmp_path / "retuned" / "config.json").read_text())
    assert config["pre_seq_len"] == 3 and config["prefix_projection"] is False
