"""Building Meta-layout LLaMA folders from Hugging Face state dicts, and converting them back whole.

``hf_to_meta`` inverts transformers' ``convert_llama_weights_to_hf.py``, so tests can make Meta
folders from tiny random models; ``meta_to_hf`` is that conversion done the script's way (every
shard loaded whole, joined, then q/k permuted), an independent reference for the streamed reader.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

# HF suffix of a per-layer tensor -> (Meta suffix, dim the shards join on; None: replicated).
LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}

# the tiny Meta-layout models: hidden, heads, kv heads, FFN; "wide" only for its shapes
VOCAB = 96
MODELS = {"mha": (64, 8, 8, 176), "gqa": (128, 16, 8, 344), "wide": (1024, 8, 8, 2816)}



def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta -> HF rotary layout: per head, rows (pairs, 2) become (2, pairs)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of :func:`permute`."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _mapping(n_layers: int) -> dict[str, tuple[str, int | None]]:
    mapping = dict(GLOBAL_TENSORS)
    for i in range(n_layers):
        for hf, (meta, join) in LAYER_TENSORS.items():
            mapping[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{meta}", join)
    return mapping


def _kv_heads(params: dict) -> int:
    return params.get("n_kv_heads") or params["n_heads"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def hf_to_meta(state_dict: dict[str, torch.Tensor], params: dict, num_shards: int, out_dir: Path) -> None:
    """Write ``consolidated.NN.pth`` shards, ``params.json`` and ``checklist.chk`` into ``out_dir``.

    Shards hold ``rope.freqs`` too, as LLaMA 1's do, so readers are seen to drop it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for hf, (meta, join) in _mapping(params["n_layers"]).items():
        tensor = state_dict[hf]
        if hf.endswith("q_proj.weight"):
            tensor = unpermute(tensor, params["n_heads"])
        elif hf.endswith("k_proj.weight"):
            tensor = unpermute(tensor, _kv_heads(params))
        for shard, part in enumerate(
            [tensor] * num_shards if join is None else tensor.chunk(num_shards, dim=join)
        ):
            # clone: a saved view would write its whole storage into every shard
            shards[shard][meta] = part.clone()
    head_dim = params["dim"] // params["n_heads"]
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    names = []
    for shard, tensors in enumerate(shards):
        tensors["rope.freqs"] = freqs
        names.append(f"consolidated.{shard:02d}.pth")
        torch.save(tensors, out_dir / names[-1])
    (out_dir / "params.json").write_text(json.dumps(params))
    names.append("params.json")
    lines = "".join(f"{md5(out_dir / name)}  {name}\n" for name in names)
    (out_dir / "checklist.chk").write_text(lines)


def meta_to_hf(meta_dir: Path) -> dict[str, torch.Tensor]:
    """The conversion as transformers' script does it: all shards loaded, joined, q/k permuted."""
    params = json.loads((meta_dir / "params.json").read_text())
    paths = sorted(meta_dir.glob("consolidated.*.pth"))
    loaded = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    result = {}
    for hf, (meta, join) in _mapping(params["n_layers"]).items():
        parts = [shard[meta] for shard in loaded]
        tensor = parts[0] if join is None else torch.cat(parts, dim=join)
        if hf.endswith("q_proj.weight"):
            tensor = permute(tensor, params["n_heads"])
        elif hf.endswith("k_proj.weight"):
            tensor = permute(tensor, _kv_heads(params))
        result[hf] = tensor
    return result


def train_tokenizer(path: Path) -> None:
    """A tiny sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    words = ["alpha", "beta", "gamma", "delta", "merge", "tensor", "llama", "model", "shard"]
    text = path.with_suffix(".txt")
    text.write_text("\n".join(" ".join(words[(i * j) % 9] for j in range(7)) for i in range(60)))
    with open(path, "wb") as model:
        sentencepiece.SentencePieceTrainer.train(
            input=str(text), model_writer=model, vocab_size=60, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )  # fmt: skip


def hf_shapes(kind: str, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    hidden, heads, kv, ffn = MODELS[kind]
    kv_dim = hidden // heads * kv
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def hf_state(kind: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g).to(dtype) for name, shape in hf_shapes(kind).items()}



