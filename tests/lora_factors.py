"""Adapters that test something: peft starts B at zero, so a fresh adapter's product is zero."""

from __future__ import annotations

import torch


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Every LoRA factor and every saved whole module of a peft model, random and small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
