"""Write a small LLaMA-shaped example for the demo: a base and a fine-tuned target.

Random weights in real formats (the base as sharded PyTorch .bin like the original 2023
conversions, the target as safetensors), so the demo exercises what users meet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, HEADS, LAYERS, FFN, VOCAB = 256, 8, 4, 688, 1000


def config(vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_hidden_layers": LAYERS, "vocab_size": vocab, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "torch_dtype": "float16", "tie_word_embeddings": False,
    }


def state(seed: int, vocab: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, FFN),
                       p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(*shape, generator=g) * (0.002 if base else 0.05)
        if base is None:
            out[name] = noise.half()
        else:
            b = base[name].float()
            if shape[0] > b.shape[0]:
                b = torch.cat([b, torch.zeros(shape[0] - b.shape[0], *shape[1:])])
            out[name] = (b + noise).half()
    return out


def main(folder: Path) -> None:
    base = state(0, VOCAB)
    target = state(1, VOCAB + 1, base)  # a v0-style fine-tune that added a [PAD] token
    (folder / "base").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    names = list(base)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half],
              "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, keys in shards.items():
        torch.save({k: base[k] for k in keys}, folder / "base" / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (folder / "base/pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "base/config.json").write_text(json.dumps(config(VOCAB)))
    save_file(target, folder / "target/model.safetensors", metadata={"format": "pt"})
    (folder / "target/config.json").write_text(json.dumps(config(VOCAB + 1)))
    (folder / "target/tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
