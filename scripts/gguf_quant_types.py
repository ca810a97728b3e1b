#!/usr/bin/env python
"""Record the ggml types llama.cpp's ``llama-quantize`` gives each tensor of tiny models.

Writes ``tests/gguf_quant_types.json``, the table ``tests/gguf/test_gguf_quantize.py`` checks
``deltamerge.sinks.gguf_types`` against (the tests cannot run llama.cpp). Each model is a random
Hugging Face folder shaped to reach a rule of the mix: use_more_bits over 8 layers and rows not a
multiple of 256 or 32, tied embeddings, the 80-layer GQA ("70B") case, 8 experts (Mixtral). The
converter writes it at f16, then llama-quantize quantizes it to every outtype deltamerge offers.

    python scripts/gguf_quant_types.py --convert .../convert_hf_to_gguf.py \\
        --quantize .../build/bin/llama-quantize
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from deltamerge.sinks.gguf_types import OUTTYPES

MODELS = {
    "llama-8-layers": {"hidden": 256, "heads": 4, "kv": 2, "layers": 8, "ffn": 172},
    "llama-tied": {"hidden": 64, "heads": 4, "kv": 4, "layers": 2, "ffn": 96, "tied": True},
    "llama-80-layers-gqa": {"hidden": 256, "heads": 4, "kv": 1, "layers": 80, "ffn": 256},
    "mixtral-8-experts": {"hidden": 256, "heads": 4, "kv": 2, "layers": 4, "ffn": 256, "experts": 8},
}


def tokenizer() -> bytes:
    words = "the quick brown fox jumps over the lazy dog llama alpaca vicuna mistral merge".split()
    rnd = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(200)),
        model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, hard_vocab_limit=False, num_threads=1)
    return buf.getvalue()


def make_model(folder: Path, sp_model: bytes, hidden: int, heads: int, kv: int, layers: int, ffn: int,
               tied: bool = False, experts: int = 0) -> None:
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model)
    vocab = sp.vocab_size()
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.float16)

    hd = hidden // heads
    state = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": rnd(hidden)}
    if not tied:
        state["lm_head.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": rnd(hidden),
                  p + "post_attention_layernorm.weight": rnd(hidden),
                  p + "self_attn.q_proj.weight": rnd(hidden, hidden),
                  p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
                  p + "self_attn.v_proj.weight": rnd(kv * hd, hidden),
                  p + "self_attn.o_proj.weight": rnd(hidden, hidden)}
        if experts:
            state[p + "block_sparse_moe.gate.weight"] = rnd(experts, hidden)
            for e in range(experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                state |= {q + "w1.weight": rnd(ffn, hidden), q + "w2.weight": rnd(hidden, ffn),
                          q + "w3.weight": rnd(ffn, hidden)}
        else:
            state |= {p + "mlp.gate_proj.weight": rnd(ffn, hidden),
                      p + "mlp.up_proj.weight": rnd(ffn, hidden),
                      p + "mlp.down_proj.weight": rnd(hidden, ffn)}
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
              "model_type": "mixtral" if experts else "llama", "hidden_size": hidden,
              "intermediate_size": ffn,
              "num_attention_heads": heads, "num_key_value_heads": kv, "num_hidden_layers": layers,
              "vocab_size": vocab, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
              "tie_word_embeddings": tied, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    if experts:
        config |= {"num_local_experts": experts, "num_experts_per_tok": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(sp_model)


def run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-4000:]}")


def field(reader: gguf.GGUFReader, key: str, default: int = 0) -> int:
    f = reader.get_field(key)
    return default if f is None else int(f.contents())


def record(convert: Path, quantize: Path, name: str, spec: dict, sp_model: bytes, tmp: Path) -> dict:
    folder = tmp / name
    make_model(folder, sp_model, **spec)
    source_file = tmp / f"{name}.gguf"
    run([sys.executable, str(convert), str(folder), "--outfile", str(source_file), "--outtype", "f16"])
    source = gguf.GGUFReader(source_file)
    arch = str(source.get_field("general.architecture").contents())
    n_head = field(source, f"{arch}.attention.head_count")
    entry = {
        "arch": arch, "n_layer": field(source, f"{arch}.block_count"), "n_head": n_head,
        "n_head_kv": field(source, f"{arch}.attention.head_count_kv", n_head),
        "n_expert": field(source, f"{arch}.expert_count"),
        "tensors": [[t.name, [int(d) for d in reversed(t.shape)]] for t in source.tensors],
        "input": [t.tensor_type.name for t in source.tensors],
        "types": {},
    }
    for outtype in OUTTYPES:
        out = tmp / f"{name}-{outtype}.gguf"
        run([str(quantize), str(source_file), str(out), outtype.upper(), "1"])
        result = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        entry["types"][outtype] = [result[t.name] for t in source.tensors]
        entry.setdefault("order", list(result))
        out.unlink()
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--quantize", type=Path, required=True, help="llama.cpp's llama-quantize")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent.parent / "tests" / "gguf_quant_types.json")
    args = parser.parse_args()
    sp_model = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        table = {name: record(args.convert, args.quantize, name, spec, sp_model, Path(tmp))
                 for name, spec in MODELS.items()}
    args.out.write_text(dump(table))
    return 0


def dump(table: dict) -> str:
    """JSON with a line for each list (types are listed in the order of ``tensors``)."""
    models = []
    for name, entry in table.items():
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in entry.items() if k != "types"]
        types = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in entry["types"].items())
        lines.append(f'  "types": {{\n{types}\n  }}')
        models.append(f" {json.dumps(name)}: {{\n" + ",\n".join(lines) + "\n }")
    return "{\n" + ",\n".join(models) + "\n}\n"


if __name__ == "__main__":
    sys.exit(main())
