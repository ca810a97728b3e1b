"""Write a small LLaMA-shaped example for the demo: a base and a fine-tuned target.

Random weights in real formats (the base as sharded PyTorch .bin like the original 2023
conversions, the target as safetensors), so the demo exercises what users meet. It needs only
torch, what a plain install of deltamerge has: safetensors' own writer needs numpy, so the
target is written here (the format is a JSON header and the tensors' bytes).
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import warnings
from pathlib import Path

with warnings.catch_warnings():  # torch warns on import when numpy is absent
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

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


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Little-endian tensor bytes after a header of their dtypes, shapes and offsets."""
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.contiguous()
        blobs.append(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


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
    save_safetensors(target, folder / "target/model.safetensors")
    (folder / "target/config.json").write_text(json.dumps(config(VOCAB + 1)))
    (folder / "target/tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
