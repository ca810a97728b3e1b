"""PandaGPT as its repository builds it: the Vicuna v0 delta it expects, its OpenLLAMAPEFTModel, and
the pytorch_model.pt its agent.save_model writes; with what its web_demo.py loads, the reference."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from helpers import llama_state, load_state, save_checkpoint
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

from deltamerge import make_delta

IMAGEBIND = 1024  # ImageBind-huge's embedding width, PandaGPT's visual_hidden_size


VICUNA_V0_VOCAB = 97  # LLaMA's vocabulary plus Vicuna v0's [PAD]


LORA = {"r": 8, "lora_alpha": 16}  # PandaGPT's openllama_peft.yaml says 32 and 32; tiny here


class OpenLLAMAPEFTModel(nn.Module):
    """PandaGPT's model as far as its checkpoint goes (code/model/openllama.py)."""

    def __init__(self, vicuna: Path, r: int, lora_alpha: int):
        super().__init__()
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=r,
                            lora_alpha=lora_alpha, lora_dropout=0.1,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        llama = LlamaForCausalLM.from_pretrained(vicuna, dtype=torch.float16)
        self.llama_model = get_peft_model(llama, config)
        self.llama_proj = nn.Linear(IMAGEBIND, llama.config.hidden_size)


def make_panda(root: Path) -> dict[str, Path]:
    """LLaMA, the Vicuna v0 delta (one more vocabulary row), and PandaGPT's pytorch_model.pt."""
    llama = save_checkpoint(llama_state(0), root / "llama-13b", "bin")
    vicuna = save_checkpoint(llama_state(1, vocab=VICUNA_V0_VOCAB), root / "vicuna-13b")
    make_delta(llama, vicuna, root / "vicuna-13b-delta-v0")
    # FastChat's apply in fp16 (rows beyond LLaMA's start at zero): the Vicuna PandaGPT loads.
    base, delta = load_state(llama), load_state(root / "vicuna-13b-delta-v0")
    rebuilt = {}
    for name, d in delta.items():
        b = torch.zeros_like(d)
        b[: base[name].shape[0]] = base[name]
        rebuilt[name] = b + d
    save_checkpoint(rebuilt, root / "vicuna-rebuilt")
    model = OpenLLAMAPEFTModel(root / "vicuna-rebuilt", **LORA)
    g = torch.Generator().manual_seed(3)
    checkpoint = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:  # agent.save_model: only the trainable parameters (fp16 under DeepSpeed)
            checkpoint[name] = nn.Parameter((torch.randn(p.shape, generator=g) * 0.1).half())
    (root / "pandagpt-13b").mkdir()
    torch.save(checkpoint, root / "pandagpt-13b" / "pytorch_model.pt")
    return {"llama": llama, "delta": root / "vicuna-13b-delta-v0", "vicuna": root / "vicuna-rebuilt",
            "panda": root / "pandagpt-13b"}


def panda_reference(panda: dict[str, Path]) -> dict[str, torch.Tensor]:
    """What PandaGPT's web_demo.py loads, its LoRA merged by peft, and its llama_proj."""
    model = OpenLLAMAPEFTModel(panda["vicuna"], **LORA)
    delta_ckpt = torch.load(panda["panda"] / "pytorch_model.pt", weights_only=True)
    missing, unexpected = model.load_state_dict(delta_ckpt, strict=False)
    assert not unexpected
    merged = model.llama_model.merge_and_unload().state_dict()
    return {**merged, "llama_proj.weight": delta_ckpt["llama_proj.weight"],
            "llama_proj.bias": delta_ckpt["llama_proj.bias"]}
