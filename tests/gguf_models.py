"""Tiny LLaMA result folders with a real sentencepiece tokenizer, as the GGUF tests convert them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from click.testing import CliRunner
from helpers import HEADS, HIDDEN, LAYERS, llama_config, llama_state, load_state, save_checkpoint
from llamacpp import Conversion
from safetensors.torch import save_file

from deltamerge.cli import main

HEAD_DIM = HIDDEN // HEADS


CHAT_TEMPLATE = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
WIDE, WIDE_FFN, WIDE_KV = 256, 64, 1  # rows of 256: the k-quants apply (ffn_down falls back)


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


def wide_llama(folder: Path, sp_model: bytes, dtype: torch.dtype, seed: int = 0) -> Path:
    """tiny_llama's files with rows of 256 values, one layer, 4 heads, one key/value head and
    the embeddings tied (no lm_head: llama-quantize gives token_embd the output's type)."""
    tiny_llama(folder, sp_model, dtype)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    kv = WIDE_KV * WIDE // 4
    state = {"model.embed_tokens.weight": rnd(vocab, WIDE), "model.norm.weight": rnd(WIDE)}
    for i in range(1):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm": (WIDE,), "post_attention_layernorm": (WIDE,),
                  "self_attn.q_proj": (WIDE, WIDE), "self_attn.k_proj": (kv, WIDE),
                  "self_attn.v_proj": (kv, WIDE), "self_attn.o_proj": (WIDE, WIDE),
                  "mlp.gate_proj": (WIDE_FFN, WIDE), "mlp.up_proj": (WIDE_FFN, WIDE),
                  "mlp.down_proj": (WIDE, WIDE_FFN)}
        state |= {f"{p}{name}.weight": rnd(*shape) for name, shape in shapes.items()}
    (folder / "model.safetensors").unlink()
    config = llama_config(vocab, str(dtype).removeprefix("torch."), hidden_size=WIDE,
                          intermediate_size=WIDE_FFN, num_key_value_heads=WIDE_KV, num_hidden_layers=1,
                          tie_word_embeddings=True)
    save_checkpoint(state, folder, config=config, tokenizer=False)
    return folder


def perturbed(folder: Path, out: Path, seed: int) -> Path:
    """A fine-tune of ``folder``: every tensor plus small noise, the other files as they are."""
    g = torch.Generator().manual_seed(seed)
    tuned = {n: (t.float() + torch.randn(t.shape, generator=g) * 0.01).to(t.dtype)
             for n, t in load_state(folder).items()}
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
    return out


def gguf_digests(paths: list[Path]) -> dict:
    """Each tensor's bytes in the files, hashed afresh as deltamerge-result.json records them."""
    import gguf

    from deltamerge.integrity.digest import hash_bytes

    digests = {}
    for path in paths:
        for t in gguf.GGUFReader(path).tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            digests[t.name] = {"dtype": t.tensor_type.name, "shape": list(shape),
                               "blake3": hash_bytes(t.data.tobytes())}
    return digests


RECORD = "deltamerge-result.json"


def cli(*args: object) -> None:
    """``deltamerge ARGS -q`` in this process, which must succeed."""
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, (result.stderr, result.exception)


def ours_and_converters(
    base: Path, delta: Path, root: Path, name: str
) -> tuple[dict[str, Path], dict[str, bytes]]:
    """deltamerge's f16 GGUF of ``base`` + ``delta`` (file name -> path), and the converter's of
    the same merge written as a Hugging Face folder named ``name`` (file name -> bytes), the
    converter running while ours is written."""
    merged = root / "hf" / name
    merged.parent.mkdir()
    (root / "gguf").mkdir()
    cli("apply", base, delta, merged)
    with Conversion(merged, root / "converted", "f16") as conversion:
        cli("apply", base, delta, root / "gguf" / name, "--format", "gguf", "--outtype", "f16")
        ours = {p.name: p for p in sorted((root / "gguf" / name).glob("*.gguf"))}
        theirs = conversion.files()
    return ours, theirs


def assert_resumed_as(resumed, out: Path, reference: Path) -> dict:  # noqa: ANN001 - a CompletedProcess
    """A resumed run that kept what it had re-checked, and whose files and record's result are
    the reference run's; returns that result."""
    assert resumed.returncode == 0, resumed.stderr
    assert "re-checked and kept" in resumed.stdout
    for path in reference.iterdir():
        if path.name != RECORD:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    ours, theirs = (json.loads((f / RECORD).read_text())["result"] for f in (out, reference))
    assert ours == theirs
    return ours
