"""Tiny LLaMA result folders with a real sentencepiece tokenizer, as the GGUF tests convert them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import HEADS, HIDDEN, LAYERS, llama_config, llama_state, save_checkpoint

HEAD_DIM = HIDDEN // HEADS


CHAT_TEMPLATE = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


def sp_vocab_size(model: bytes) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    return sp.vocab_size()


def tiny_llama(folder: Path, sp_model: bytes, dtype: torch.dtype = torch.float16, kv_heads: int = HEADS,
               **config: object) -> Path:
    """A LLaMA-2-shaped result folder: weights, config.json and the tokenizer's files."""
    vocab = sp_vocab_size(sp_model)
    state = llama_state(1, dtype, vocab)
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = state[name][: kv_heads * HEAD_DIM].clone()
    dtype_name = str(dtype).removeprefix("torch.")
    save_checkpoint(state, folder, config=llama_config(vocab, dtype_name, num_key_value_heads=kv_heads,
                                                       **config), tokenizer=False)
    (folder / "tokenizer.model").write_bytes(sp_model)
    specials = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": specials, "chat_template": CHAT_TEMPLATE}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def specs(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for i in range(LAYERS) for hf, g in (
        ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"))},
}


def permuted(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Each head's row 2i+j is its input row j*head_dim/2+i (llama.cpp's rotary layout)."""
    rows = t.shape[0] // n_head
    half = rows // 2
    index = [h * rows + j * half + i for h in range(n_head) for i in range(half) for j in range(2)]
    return t[index]
