#!/usr/bin/env python
r"""Benchmark deltamerge against the disk's own floor, on generated LLaMA-shaped checkpoints.

A merge reads two models and writes one, so it can be no faster than the disk moving those bytes.
Run a, the floor, measures exactly that in every round: each input folder read once and a file of
the result's size written, each past the page cache (O_DIRECT, 64 MiB aligned blocks, fsync), one
after the other. Every other run is reported as a ratio to its own floor (its inputs' reads plus
its result's write, from the same round). A pipelined run can go below 1.0x where the disk
serves reads and writes at the same time, or where reading through the page cache (the kernel's
read-ahead) is faster than the floor's direct reads: docs/performance.md, "What the disk does",
has a machine where it is.

Runs (--runs, default all):
  a  the disk floor (above)
  b  deltamerge apply BASE DELTA OUT: verified against the delta's deltamerge.json (format 2:
     the base's tensors, the delta's tensors and the result, each byte hashed once, BLAKE3)
  c  deltamerge apply --no-verify: only the result is hashed (for its record)
  d  deltamerge make-delta BASE TARGET OUT (base, target, delta and rebuilt result hashed)
  e  a LoRA merge: a PEFT adapter, rank 64 on all seven linear projections of every layer
  f  an XOR delta applied (make-delta --kind xor)
  g  the naive in-memory merge (load_file both, add, save_file); skipped when it cannot fit
  h  convert from Meta's layout (the base written again as 2 model-parallel .pth shards)
  i  run b written as GGUF f16 (--format gguf --outtype f16; the base gets a small tokenizer);
     with --arch, also each named architecture's base and delta (below)
  j  run b written in Meta's layout (--format meta --mp 1); compare i and j with b
  k  make-delta --kind xor --compress (zstd byte planes); reports its weights' size over the
     plain XOR delta's (size_ratio_to_xor)
  l  that compressed XOR delta applied; reports the same size ratio, and its time over run f's
     (time_ratio_to_f, when f ran too)
  n  run b written as a GGUF k-quant (--format gguf --outtype q4_k_m, or --outtype); reports its
     time over run o's (time_ratio_to_o)
  o  the baseline n replaces the last step of: llama.cpp's llama-quantize alone (--llama-quantize
     PATH; skipped without it) on the f16 GGUF of run b's result (made once, by deltamerge, before
     the rounds), to the same type with the same threads (--threads, else the machine's cores);
     its peak is ru_maxrss, not VmHWM
  p  a DoRA merge: run e's adapter with use_dora (and a magnitude vector per module)
  q  an IA3 merge: a vector on each of the seven projections (down_proj's on its inputs)
  r  a LoHa merge, rank 64, and s  a LoKr merge, rank 64 (LyCORIS' types), on the seven projections
     p, q, r and s report their time over run e's (time_ratio_to_e)

Architectures (--arch NAME[,NAME...], or all; each is run i on its own inputs, in the same rounds
as run i on the LLaMA inputs):
  llama3 (BPE, rope llama3), qwen2, qwen3, gemma, gemma2, gemma3, phi3, falcon, bloom, mixtral,
  gpt_neox. Each is transformers' own config class at the preset's widths (hidden, intermediate,
  heads; key/value heads = heads, as in the LLaMA inputs) and --layers, its tensors named and
  shaped as save_pretrained writes them, random values as the LLaMA inputs have, a real tokenizer
  (llama.cpp's vocab GGUFs: --llamacpp DIR or $DELTAMERGE_LLAMACPP, from fetch_llamacpp.sh;
  scripts/llamacpp_vocab.py builds each tokenizer folder once, in its tokenizers/) with as many
  embedding rows as it has tokens (Llama 3 128256, Qwen 151936, Gemma 262144, Falcon 65024,
  Phi-3 32064), and an additive delta (make-delta; the target is removed once it is made).
  Where it differs: Falcon and BLOOM have their own MLP of 4 x hidden; Mixtral has 4 experts,
  not 8 (MIXTRAL_EXPERTS: 8 at 7B widths are 2.2 GB a layer); BLOOM and GPT-NeoX have GPT-2's
  BPE padded to their own 250880 and 50432 rows (llama.cpp has no BLOOM vocabulary, and the
  pinned converter knows no pre-tokenizer of its GPT-NeoX one; BLOOM's tokenizer_config names
  BLOOM's own class, BloomTokenizerFast); Gemma 1, 2 and 3 have Gemma 4's
  sentencepiece vocabulary (262144 pieces, Gemma 3's own count). Before any weight is written
  deltamerge plans the architecture's GGUF: one it refuses (GPT-NeoX before its GGUF output) is
  skipped, its row saying why. Every run reports s/GB out (seconds per GB of output written);
  each architecture, the ratio of its own to run i's on the LLaMA inputs at the same --threads
  (per_byte_ratio_to_llama). At 7B widths with 2 layers a model is 1.3 (Phi-3, Falcon) to 3.3 GB
  (Qwen); its base and delta are kept, and making them takes up to 3 models' room: with little
  disk, give --arch in groups (each group gets its own LLaMA run i to compare with).

Method: the rounds alternate (a b c ... a b c ...) so drift in the machine hits every run alike;
each figure is the median of --repeat rounds. Before every run the inputs are evicted from the
page cache (sync, then posix_fadvise DONTNEED on every input file), so every run reads the disk.
Every run is a child process whose peak memory is its own VmHWM (/proc/self/status, read as it
exits: VmHWM starts afresh at exec, whereas ru_maxrss keeps the image the child was forked from).
--threads N is passed to every deltamerge run that has a compute pool (all but d and k, which
take no --threads) and to llama-quantize; --threads 1,2 measures each such run at both in the
same rounds (e@1, e@2, ...), and reports each at 2 over itself at 1 (time_ratio_to_threads_1).

Inputs are generated first (random fp16 values; base, a fine-tune of it, the peft adapters, and
the deltas made with this deltamerge); --reuse DIR keeps them in DIR and reuses them in later runs
of the same preset, layers, dtype, shard size and --sparse (DIR records what it holds and refuses
another config); a later run makes only the inputs DIR still lacks.
--sparse makes all-zero inputs that take no disk: for memory at full scale, not for speed.

The runs for issue 15's targets (7B, real data, medians of 3, cache dropped):

    python scripts/bench.py --preset 7b --runs a,b,c,d,e --repeat 3 --reuse bench-data/7b \
        --json --plot docs/bench-7b.png > bench-7b.json
    python scripts/bench.py --preset 65b --sparse --layers 4 --runs a,b,c,e --repeat 1 \
        --reuse bench-data/65b-sparse

The runs for issue 22 (a k-quant in the merge's pass against llama-quantize alone, 2 threads, at
the issue's own 7B widths with 2 layers) and issue 23 (each peft type against LoRA at the same
rank, and every kind at 1 and 2 threads, at the widths and layers of docs/performance.md):

    python scripts/bench.py --preset 7b --layers 2 --runs a,n,o --threads 2 --repeat 3 \
        --llama-quantize llama.cpp/build/bin/llama-quantize --reuse bench-data/7b2 --json
    python scripts/bench.py --preset 7b --layers 16 --runs a,b,e,f,l,p,q,r,s --threads 1,2 \
        --repeat 3 --reuse bench-data/7b16 --json

The runs for issue 22's architectures (run i on each, against LLaMA's, per GB written):

    export DELTAMERGE_LLAMACPP=$(scripts/fetch_llamacpp.sh)
    python scripts/bench.py --preset 7b --layers 2 --runs i --arch all --repeat 3 --json

Issue 24's comparisons need a real pretrained model and its fine-tune, and the other tool in a
venv of its own, so they are scripts beside this one (docs/performance.md has their figures):
scripts/real_finetune_pair.py makes the pair (Gemma 3 270M from PyPI, fine-tuned on CPU),
scripts/zipnn_compare.py sizes and times make-delta --kind xor --compress against zipnn's delta,
and scripts/mergekit_compare.py make-delta --kind lora against mergekit-extract-lora.

Smaller checks:

    python scripts/bench.py --preset tiny --repeat 1
    python scripts/bench.py --preset 13b --layers 6 --runs a,b,c,d --plot bench.png
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import math
import mmap
import os
import random
import runpy
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deltamerge.outputs.gguf import QUANTIZED_OUTTYPES  # noqa: E402 - after the path; no torch

META = {"format": "pt"}
DIRECT_BLOCK = 64 * 1024 * 1024  # O_DIRECT transfers: large, and a multiple of any block size
ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of the device's logical block
CHUNK_ELEMS = 8 * 1024 * 1024
POOL_BYTES = 64 * 1024 * 1024
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
LORA_RANK = 64
LORA_ALPHA = 16
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUNS = {
    "a": "disk floor",
    "b": "apply (verify)",
    "c": "apply --no-verify",
    "d": "make-delta",
    "e": "LoRA merge r=64",
    "f": "XOR apply",
    "g": "naive in-memory",
    "h": "convert from Meta",
    "i": "apply to GGUF f16",
    "j": "apply to Meta",
    "k": "XOR-zstd make-delta",
    "l": "XOR-zstd apply",
    "n": "apply to GGUF k-quant",
    "o": "llama-quantize alone",
    "p": "DoRA merge r=64",
    "q": "IA3 merge",
    "r": "LoHa merge r=64",
    "s": "LoKr merge r=64",
}
# The input folders each run reads (the floor's reads for it); all write one result.
RUN_INPUTS = {
    "a": ("base", "delta"), "b": ("base", "delta"), "c": ("base", "delta"),
    "d": ("base", "target"), "e": ("base", "lora"), "f": ("base", "xor"),
    "g": ("base", "delta"), "h": ("meta",), "i": ("base", "delta"), "j": ("base", "delta"),
    "k": ("base", "target"), "l": ("base", "xorz"), "n": ("base", "delta"), "o": ("gguf16",),
    "p": ("base", "dora"), "q": ("base", "ia3"), "r": ("base", "loha"), "s": ("base", "lokr"),
}
XOR_ZSTD_RUNS = ("k", "l")  # their sizes are compared with the plain XOR delta's
# The peft adapter each adapter run merges (its input folder, of the same name).
ADAPTER_RUNS = {"e": "lora", "p": "dora", "q": "ia3", "r": "loha", "s": "lokr"}
ADAPTER_SEEDS = {"lora": 3, "dora": 4, "ia3": 5, "loha": 6, "lokr": 7}
# The runs that apply one input folder of their own to the base.
APPLIED = {"f": "xor", "l": "xorz", **ADAPTER_RUNS}
IA3_FEEDFORWARD = ("down_proj",)  # peft's own default for LLaMA (its IA3 feedforward mapping)
# A run's time over another's of the same round set and thread count (time_ratio_to_X).
RATIO_TO = {"l": "f", "n": "o", "p": "e", "q": "e", "r": "e", "s": "e"}
# Runs with no compute pool, so no --threads: the floor, make-delta and the naive merge.
NO_THREADS = ("a", "d", "g", "k")
GGUF_RUNS = ("i", "n", "o")  # the base needs a tokenizer.model for these
STAMP = "bench-inputs.json"
DATA_VERSION = 2  # bumped when generated inputs change meaning (2: deltas with manifest format 2)
FLOOR_NOTE = ("x floor: the run's wall time over its disk floor (its inputs read once and its "
              "result written, past the page cache, one after the other, in the same round). A "
              "pipelined run can go below 1.0 where the disk serves reads and writes at once, or where "
              "reading through the page cache is faster than the floor's direct reads.")
# Runs i and j: run b's apply written in another format (which takes no --max-shard-size).
FORMAT_RUNS = {"i": ["--format", "gguf", "--outtype", "f16"], "j": ["--format", "meta", "--mp", "1"]}


@dataclass(frozen=True)
class Preset:
    hidden: int
    heads: int
    layers: int
    ffn: int
    shard: str
    vocab: int = 32000


PRESETS = {
    "tiny": Preset(128, 4, 2, 344, "8MB"),
    "7b": Preset(4096, 32, 32, 11008, "5GB"),
    "13b": Preset(5120, 40, 40, 13824, "5GB"),
    # LLaMA-65B's widths: with --sparse --layers 4 the memory of the largest shapes, at no disk.
    "65b": Preset(8192, 64, 80, 22016, "5GB"),
}


# -- shapes and files ----------------------------------------------------------------------------
def linear_shapes(p: Preset) -> dict[str, tuple[int, int]]:
    """[out, in] of each linear projection of a layer, as PEFT's LoRA factors need them."""
    h, f = p.hidden, p.ffn
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
        "mlp.down_proj": (h, f),
    }


def llama_shapes(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a LLaMA checkpoint in Hugging Face's state-dict order."""
    shapes = [("model.embed_tokens.weight", (p.vocab, p.hidden))]
    for i in range(p.layers):
        pre = f"model.layers.{i}."
        shapes += [(f"{pre}{m}.weight", s) for m, s in linear_shapes(p).items()]
        shapes += [(f"{pre}{n}.weight", (p.hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    shapes += [("model.norm.weight", (p.hidden,)), ("lm_head.weight", (p.vocab, p.hidden))]
    return shapes


def adapter_parts(kind: str, module: str, out: int, inp: int) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors peft saves for one Linear module [out, in] of an adapter of ``kind``, named
    after the module as in its adapter_model.safetensors (rank 64 where the type has a rank)."""
    r = LORA_RANK
    if kind in ("lora", "dora"):
        parts = [("lora_A.weight", (r, inp)), ("lora_B.weight", (out, r))]
        return parts + [("lora_magnitude_vector", (out,))] if kind == "dora" else parts
    if kind == "ia3":  # one factor per output row, or per input column on feedforward modules
        return [("ia3_l", (1, inp) if module.endswith(IA3_FEEDFORWARD) else (out, 1))]
    if kind == "loha":
        return [(f"hada_w{k}_{ab}", (out, r) if ab == "a" else (r, inp)) for k in (1, 2) for ab in "ab"]
    from deltamerge.kinds.lokr import peft_layout  # the factors peft makes for this shape and r

    return list(peft_layout(out, inp, r, False, -1).items())


def adapter_shapes(p: Preset, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """An adapter's tensors on all seven linear projections of every layer, in peft's names."""
    shapes = []
    for i in range(p.layers):
        for module, (out, inp) in linear_shapes(p).items():
            key = f"base_model.model.model.layers.{i}.{module}"
            shapes += [(f"{key}.{part}", shape) for part, shape in adapter_parts(kind, module, out, inp)]
    return shapes


def adapter_config(kind: str) -> dict:
    """adapter_config.json of each type, with peft 0.21's field names (its config classes'
    ``to_dict``, as ``save_pretrained`` writes them)."""
    common = {"task_type": "CAUSAL_LM", "target_modules": list(LORA_MODULES), "modules_to_save": None,
              "base_model_name_or_path": "base"}
    if kind in ("lora", "dora"):
        return {"peft_type": "LORA", **common, "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": kind == "dora", "rank_pattern": {}, "alpha_pattern": {}}
    if kind == "ia3":
        return {"peft_type": "IA3", **common, "feedforward_modules": list(IA3_FEEDFORWARD),
                "fan_in_fan_out": False, "init_ia3_weights": True}
    lycoris = {**common, "r": LORA_RANK, "alpha": LORA_ALPHA, "rank_dropout": 0.0,
               "module_dropout": 0.0, "use_effective_conv2d": False, "rank_pattern": {},
               "alpha_pattern": {}, "init_weights": True}
    if kind == "loha":
        return {"peft_type": "LOHA", **lycoris}
    return {"peft_type": "LOKR", **lycoris, "decompose_both": False, "decompose_factor": -1,
            "rank_dropout_scale": False}


def model_bytes(p: Preset, dtype: str) -> int:
    return sum(math.prod(shape) for _, shape in llama_shapes(p)) * ITEMSIZE[dtype]


def llama_config(p: Preset, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": p.hidden, "intermediate_size": p.ffn, "num_attention_heads": p.heads,
        "num_key_value_heads": p.heads, "num_hidden_layers": p.layers, "vocab_size": p.vocab,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


# -- other architectures (--arch, run i) ---------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    """One architecture GGUF output supports, as run i builds it: transformers' own config class
    (``model_type``) at the preset's widths, with a real tokenizer (one of llama.cpp's vocab GGUFs,
    ``scripts/llamacpp_vocab.py``) and as many embedding rows as it has tokens (``vocab`` where
    the model's own count differs)."""

    label: str
    model_type: str
    tokenizer: str
    config: dict = field(default_factory=dict)  # the architecture's own settings
    vocab: int | None = None
    widths: str = "the preset's"  # where they differ, how
    tokenizer_class: str | None = None  # the model's own, where the borrowed tokenizer's differs


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MIXTRAL_EXPERTS = 4  # Mixtral-8x7B has 8: at 7B widths 4 keep a layer near 1 GB (8: 2.2 GB)
FOUR_TIMES = "an MLP of 4 x hidden (the architecture's own)"
ARCHITECTURES = {
    "llama3": Architecture("Llama 3", "llama", "llama-bpe",
                           {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 131072}),
    "qwen2": Architecture("Qwen2", "qwen2", "qwen2"),
    "qwen3": Architecture("Qwen3", "qwen3", "qwen2", {"head_dim": None}),
    "gemma": Architecture("Gemma", "gemma", "gemma-4", {"head_dim": None}),
    "gemma2": Architecture("Gemma 2", "gemma2", "gemma-4", {"head_dim": None}),
    "gemma3": Architecture("Gemma 3", "gemma3_text", "gemma-4", {"head_dim": None}),
    "phi3": Architecture("Phi-3", "phi3", "phi-3"),
    "falcon": Architecture("Falcon", "falcon", "falcon", {"new_decoder_architecture": True, "bias": False},
                           widths=FOUR_TIMES),
    # no BLOOM vocabulary among llama.cpp's: GPT-2's BPE, padded to BLOOM's 250880 embedding rows
    # (its tokenizer_config naming BLOOM's own class, BloomTokenizerFast, as bigscience's do)
    "bloom": Architecture("BLOOM", "bloom", "gpt-2", vocab=250880, widths=FOUR_TIMES,
                          tokenizer_class="BloomTokenizerFast"),
    "mixtral": Architecture("Mixtral", "mixtral", "llama-spm",
                            {"num_local_experts": MIXTRAL_EXPERTS, "num_experts_per_tok": 2},
                            widths=f"{MIXTRAL_EXPERTS} experts of the preset's MLP, not 8"),
    # GPT-NeoX's own vocabulary (ggml-vocab-gpt-neox) hashes to no pre-tokenizer the pinned
    # converter knows: GPT-2's BPE instead, padded to GPT-NeoX-20B's 50432 rows
    "gpt_neox": Architecture("GPT-NeoX", "gpt_neox", "gpt-2", vocab=50432),
}


def architecture_config(arch: Architecture, p: Preset, vocab: int) -> dict:
    """Arguments to transformers' config class of ``arch``: the preset's widths (all heads
    key/value heads, as the LLaMA inputs have), the layers, the vocabulary, its own settings."""
    if arch.model_type == "bloom":
        sizes = {"hidden_size": p.hidden, "n_head": p.heads, "n_layer": p.layers}
    elif arch.model_type == "falcon":
        sizes = {"hidden_size": p.hidden, "num_attention_heads": p.heads, "num_kv_heads": p.heads,
                 "num_hidden_layers": p.layers}
    else:
        sizes = {"hidden_size": p.hidden, "intermediate_size": p.ffn, "num_attention_heads": p.heads,
                 "num_key_value_heads": p.heads, "num_hidden_layers": p.layers}
    own = {k: p.hidden // p.heads if k == "head_dim" else v for k, v in arch.config.items()}
    return {**sizes, **own, "vocab_size": vocab}


def llamacpp_vocab():  # noqa: ANN201 - the module scripts/llamacpp_vocab.py
    """The sibling script that builds tokenizer folders (also when this file is loaded by path)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import llamacpp_vocab

    return llamacpp_vocab


def child_architecture(spec: dict) -> None:
    """Base and target of one architecture (--arch): its config (transformers' class at the
    preset's widths, its tensors' names and shapes from the model built on the meta device, as
    save_pretrained names them) and tokenizer, then the weights, streamed as the LLaMA ones are.
    Before any weight, deltamerge plans the GGUF of the base: an architecture it refuses prints
    ``{"refused": message}`` and makes nothing."""
    import torch
    import transformers
    from gguf import GGUFReader
    from transformers.core_model_loading import revert_weight_conversion

    from deltamerge.errors import UnsupportedError
    from deltamerge.sinks.gguf import plan_gguf

    p, arch = Preset(**spec["preset"]), ARCHITECTURES[spec["arch"]]
    dtype = getattr(torch, spec["dtype"])
    tokenizer = llamacpp_vocab().tokenizer_folder(Path(spec["llamacpp"]), arch.tokenizer)
    source = Path(spec["llamacpp"]) / "models" / f"ggml-vocab-{arch.tokenizer}.gguf"
    vocab = arch.vocab or len(GGUFReader(source).fields["tokenizer.ggml.tokens"].data)
    config = transformers.AutoConfig.for_model(arch.model_type, **architecture_config(arch, p, vocab))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tied = set(model._tied_weights_keys or {}) if config.get_text_config().tie_word_embeddings else set()
    saved = revert_weight_conversion(model, model.state_dict())  # as save_pretrained names them
    shapes = [(name, tuple(t.shape)) for name, t in saved.items() if name not in tied]
    config.architectures = [type(model).__name__]
    config.dtype = spec["dtype"]
    base, target = Path(spec["base"]), Path(spec["target"])
    shutil.copytree(tokenizer, base)
    if arch.tokenizer_class:
        settings = json.loads((base / "tokenizer_config.json").read_text())
        settings["tokenizer_class"] = arch.tokenizer_class
        (base / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    config.save_pretrained(base)
    try:
        plan_gguf(base, [(name, dtype, shape) for name, shape in shapes], outtype="f16")
    except UnsupportedError as e:
        shutil.rmtree(base)
        print(json.dumps({"refused": str(e)}))
        return
    nbytes = sum(math.prod(s) for _, s in shapes) * dtype.itemsize
    if not spec["sparse"] and 3 * nbytes > shutil.disk_usage(base).free - 2 * 10**9:  # with the delta
        shutil.rmtree(base)
        print(json.dumps({"disk": 3 * nbytes, "free": shutil.disk_usage(base.parent).free}))
        return
    shutil.copytree(base, target)
    write_models(shapes, json.loads((base / "config.json").read_text()), dtype, p.shard, [base, target],
                 spec["sparse"])
    print(json.dumps({"bytes": nbytes, "vocab": vocab}))


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def files_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def folder_bytes(folder: Path) -> int:
    return files_bytes(files_of(folder)) if folder.exists() else 0


class Pool:
    """Real-looking random values, fast: windows of a 64 MiB random block at random offsets.

    Random fp16 bytes matter only so that nothing (a sparse read, a compressing disk) makes the
    I/O cheaper than it is for real weights; generating fresh normals for every byte would make
    the setup slower than the runs it prepares.
    """

    def __init__(self, dtype, seed: int, scale: float):
        import torch

        g = torch.Generator().manual_seed(seed)
        n = POOL_BYTES // torch.empty((), dtype=dtype).element_size()
        values = (torch.randn(n, generator=g) * scale).to(dtype)
        self.data = torch.cat([values, values[:CHUNK_ELEMS]])
        self.n = n
        self.rng = random.Random(seed)

    def take(self, count: int):
        start = self.rng.randrange(self.n)
        return self.data[start:start + count]


def to_specs(shapes: list[tuple[str, tuple[int, ...]]], dtype) -> list:
    from deltamerge.tensor_spec import TensorSpec

    return [TensorSpec(name, dtype, tuple(shape)) for name, shape in shapes]


def write_sparse(path: Path, specs: list) -> None:
    """A valid safetensors file whose data is a hole: it reads as zeros and takes no disk."""
    from deltamerge.formats.safetensors import build_header

    header = build_header(specs, META)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(s.nbytes for s in specs))


def sparsify(folder: Path) -> None:
    """Punch out the data of all-zero shards (deltas of sparse inputs); the bytes stay the same."""
    for path in weight_files(folder):
        size = path.stat().st_size
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            f.truncate(8 + n)
            f.truncate(size)


def write_models(shapes: list[tuple[str, tuple[int, ...]]], config: dict, dtype, shard: str,
                 folders: list[Path], sparse: bool) -> None:
    """Base (and target = base + small noise) in transformers' sharded layout, streamed."""
    import torch

    from deltamerge.engine.plan import TensorJob, layout_shards
    from deltamerge.integrity.digest import raw_bytes
    from deltamerge.sinks.safetensors import StreamingWriter, write_index
    from deltamerge.sizes import parse_size

    jobs = [TensorJob(s, None) for s in to_specs(shapes, dtype)]
    shards = layout_shards(jobs, parse_size(shard))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        write_index(folder, shards)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if sparse:
        for folder in folders:
            for s in shards:
                write_sparse(folder / s.filename, s.specs)
        return
    values, noise = Pool(dtype, 1, 0.02), Pool(dtype, 2, 0.001)
    target_buf = torch.empty(CHUNK_ELEMS, dtype=dtype)
    for s in shards:
        writers = [StreamingWriter(f / s.filename, s.specs, META) for f in folders]
        for spec in s.specs:
            for start in range(0, spec.numel, CHUNK_ELEMS):
                n = min(CHUNK_ELEMS, spec.numel - start)
                base = values.take(n)
                writers[0].write(raw_bytes(base))
                if len(writers) > 1:
                    target = torch.add(base, noise.take(n), out=target_buf[:n])
                    writers[1].write(raw_bytes(target))
        for w in writers:
            w.close()


def write_adapter(p: Preset, kind: str, folder: Path, sparse: bool) -> None:
    """A peft adapter folder of ``kind`` on all seven linear projections of every layer: small
    random fp16 values; the scales (DoRA's magnitudes, IA3's vectors) near 1, as trained ones are."""
    import torch

    from deltamerge.integrity.digest import raw_bytes
    from deltamerge.sinks.safetensors import StreamingWriter

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(kind), indent=2))
    specs = to_specs(adapter_shapes(p, kind), torch.float16)
    path = folder / "adapter_model.safetensors"
    if sparse:
        write_sparse(path, specs)
        return
    pool = Pool(torch.float16, ADAPTER_SEEDS[kind], 0.02)
    writer = StreamingWriter(path, specs, META)
    for spec in specs:
        scale = spec.name.endswith(("ia3_l", "lora_magnitude_vector"))
        for start in range(0, spec.numel, CHUNK_ELEMS):
            values = pool.take(min(CHUNK_ELEMS, spec.numel - start))
            writer.write(raw_bytes(values + 1 if scale else values))
    writer.close()


def child_meta(spec: dict) -> None:
    """Write the base again in Meta's layout (model-parallel shards, q/k in Meta's order).

    Each shard is built whole in memory (the model's size / shards) and saved with torch.save,
    as Meta's files were; the parent never holds it.
    """
    import torch

    from deltamerge.sources import open_checkpoint

    p, shards, out = Preset(**spec["preset"]), spec["shards"], Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    names = {"model.embed_tokens.weight": ("tok_embeddings.weight", 1),
             "lm_head.weight": ("output.weight", 0), "model.norm.weight": ("norm.weight", None)}
    for i in range(p.layers):
        hf, meta = f"model.layers.{i}.", f"layers.{i}."
        names.update({
            hf + "self_attn.q_proj.weight": (meta + "attention.wq.weight", 0),
            hf + "self_attn.k_proj.weight": (meta + "attention.wk.weight", 0),
            hf + "self_attn.v_proj.weight": (meta + "attention.wv.weight", 0),
            hf + "self_attn.o_proj.weight": (meta + "attention.wo.weight", 1),
            hf + "mlp.gate_proj.weight": (meta + "feed_forward.w1.weight", 0),
            hf + "mlp.down_proj.weight": (meta + "feed_forward.w2.weight", 1),
            hf + "mlp.up_proj.weight": (meta + "feed_forward.w3.weight", 0),
            hf + "input_layernorm.weight": (meta + "attention_norm.weight", None),
            hf + "post_attention_layernorm.weight": (meta + "ffn_norm.weight", None),
        })
    with open_checkpoint(Path(spec["base"])) as ckpt:
        for i in range(shards):  # one shard in memory at a time
            part: dict[str, torch.Tensor] = {}
            for name, (meta_name, dim) in names.items():
                s = ckpt.specs[name]
                t = ckpt.read_rows(name, 0, s.rows, torch.empty(s.nbytes, dtype=torch.uint8))
                if name.endswith(("q_proj.weight", "k_proj.weight")):  # undo HF's rotary order
                    t = t.view(p.heads, 2, p.hidden // p.heads // 2, p.hidden).transpose(1, 2)
                    t = t.reshape(p.hidden, p.hidden)
                part[meta_name] = (t if dim is None else t.chunk(shards, dim)[i]).clone()
            torch.save(part, out / f"consolidated.{i:02d}.pth")
            del part

    def ffn(multiple: int) -> int:  # LLaMA's rule, as Meta's params.json implies it
        return multiple * ((int(2 * 4 * p.hidden / 3) + multiple - 1) // multiple)

    multiple_of = next(m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if ffn(m) == p.ffn)
    params = {"dim": p.hidden, "n_heads": p.heads, "n_layers": p.layers, "norm_eps": 1e-6,
              "multiple_of": multiple_of, "vocab_size": -1}
    (out / "params.json").write_text(json.dumps(params))


def child_generate(spec: dict) -> None:
    """Write the inputs asked for (in a child: this process stays small and free of torch)."""
    import torch

    p = Preset(**spec["preset"])
    if spec["models"]:
        write_models(llama_shapes(p), llama_config(p, spec["dtype"]), getattr(torch, spec["dtype"]),
                     p.shard, [Path(f) for f in spec["models"]], spec["sparse"])
    for kind, folder in spec["adapters"].items():
        write_adapter(p, kind, Path(folder), spec["sparse"])


def write_tokenizer(folder: Path) -> None:
    """A small sentencepiece tokenizer.model, which GGUF output needs (run i): the converter pads
    its vocabulary to the config's 32000 with [PADn] tokens."""
    import io

    import sentencepiece as spm

    words = "the quick brown fox jumps over the lazy dog llama alpaca vicuna mistral merge".split()
    rnd = random.Random(0)
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, hard_vocab_limit=False, num_threads=1)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


# -- measuring -------------------------------------------------------------------------------------
@dataclass
class Measured:
    wall: float
    peak_rss: int
    peak_source: str  # "VmHWM" (the child's own) or "ru_maxrss" (when it could not report)
    returncode: int
    last_error: str
    stdout: str
    cpu: float = 0.0  # user + system seconds of the child: near 2x wall on 2 cores is CPU-bound


def measure(cmd: list[str], log: Path, program: bool = False) -> Measured:
    """Run ``cmd`` (arguments to python: ``-m deltamerge ...`` or ``--child ...``) as a child,
    through this script's ``--peak`` wrapper, which reports the child's own VmHWM as it exits.
    A ``program`` (llama-quantize) runs as it is: its peak is ru_maxrss, at least this process's."""
    peak_file, out_file = log.with_suffix(".peak"), log.with_suffix(".out")
    peak_file.unlink(missing_ok=True)
    wrapped = cmd if program else [sys.executable, str(Path(__file__).resolve()), "--peak",
                                   str(peak_file), *cmd]
    with open(log, "wb") as err, open(out_file, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    try:
        peak, source = int(peak_file.read_text()), "VmHWM"
    except (OSError, ValueError):
        peak, source = usage.ru_maxrss * 1024, "ru_maxrss"
    return Measured(wall, peak, source, code, lines[-1] if lines else "",
                    out_file.read_text(errors="replace"), usage.ru_utime + usage.ru_stime)


def run_reporting_peak(argv: list[str]) -> int:
    """``--peak FILE ARGS...``: run ARGS in this very process and write its VmHWM to FILE at exit.

    In-process, not a further exec: what is measured is the run and the interpreter it needs,
    nothing the bench holds."""
    peak_file, inner = argv[0], argv[1:]

    def report() -> None:
        from deltamerge.memory import vmhwm_bytes  # no torch: the floor's peak stays its own

        peak = vmhwm_bytes()
        if peak is not None:
            Path(peak_file).write_text(str(peak))

    atexit.register(report)
    if inner[:1] == ["-m"]:
        sys.argv = [inner[1], *inner[2:]]
        runpy.run_module(inner[1], run_name="__main__", alter_sys=True)
        return 0
    return main(inner)


def drop_cache(folders: list[Path]) -> None:
    """Evict the inputs from the page cache, so every run reads them from the disk."""
    os.sync()
    for folder in folders:
        for path in files_of(folder):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def host() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "ram_bytes": mem_total()}


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class RunResult:
    run: str
    threads: int | None = None  # the --threads it ran with (None: not given, or no pool)
    arch: str | None = None  # run i's architecture (--arch; None: the LLaMA inputs)
    status: str = "ok"
    walls: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)  # this run's floor, in the same rounds
    peak_rss: list[int] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # CPU seconds, user + system
    peak_source: str = "VmHWM"
    bytes_read: int = 0
    bytes_written: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        label = RUNS[self.run] + (f" ({ARCHITECTURES[self.arch].label})" if self.arch else "")
        out = {"run": self.run, "label": label, "threads": self.threads, "arch": self.arch,
               "status": self.status,
               "walls_s": [round(w, 3) for w in self.walls],
               "floors_s": [round(w, 3) for w in self.floors], "bytes_read": self.bytes_read,
               "bytes_written": self.bytes_written, **self.extra}
        if self.walls:
            med = statistics.median(self.walls)
            floor = statistics.median(self.floors) if self.floors else None
            out.update(
                median_s=round(med, 3),
                floor_s=round(floor, 3) if floor else None,
                ratio_to_floor=round(med / floor, 3) if floor else None,
                peak_rss_mib=round(max(self.peak_rss) / 2**20, 1),
                peak_source=self.peak_source,
                cpu_s=round(statistics.median(self.cpus), 3) if self.cpus else None,
                gb_per_s=round((self.bytes_read + self.bytes_written) / med / 1e9, 3),
                s_per_gb_written=round(med / (self.bytes_written / 1e9), 3) if self.bytes_written else None,
            )
        return out

    def tag(self) -> str:
        """The run's letter, with its architecture and thread count when it had them (i:qwen2@2)."""
        arch = f":{self.arch}" if self.arch else ""
        return f"{self.run}{arch}" if self.threads is None else f"{self.run}{arch}@{self.threads}"


class Bench:
    """The generated inputs of one benchmark, and the commands that measure each run."""

    def __init__(self, args: argparse.Namespace, data: Path):
        base = PRESETS[args.preset]
        self.preset = Preset(base.hidden, base.heads, args.layers or base.layers, base.ffn,
                             args.shard_size or base.shard)
        self.dtype = args.dtype
        self.shard = self.preset.shard
        self.sparse = args.sparse
        self.runs = args.runs
        self.data = data
        self.reuse = args.reuse is not None
        self.workers = ["--workers", str(args.workers)] if args.workers else []
        self.threads: list[int | None] = args.threads or [None]
        self.outtype = args.outtype
        self.llama_quantize = args.llama_quantize
        self.archs: list[str] = args.arch
        self.llamacpp: Path | None = args.llamacpp
        self.model_bytes = model_bytes(self.preset, self.dtype)
        self.folders = {
            "base": data / "base", "target": data / "target", "delta": data / "delta-add",
            "xor": data / "delta-xor", "meta": data / "meta", "xorz": data / "delta-xor-zstd",
            "gguf16": data / "gguf-f16", **{a: data / a for a in ADAPTER_RUNS.values()},
            **{arch_piece(a): data / arch_piece(a) for a in self.archs},  # base/ and delta/ each
        }
        self.base, self.target = self.folders["base"], self.folders["target"]
        self.delta, self.xor = self.folders["delta"], self.folders["xor"]
        self.meta, self.out = self.folders["meta"], data / "out"
        self.xorz, self.gguf16 = self.folders["xorz"], self.folders["gguf16"]
        self.setup_errors: dict[str, str] = {}
        self.floor_rounds: list[dict] = []

    # -- what the data folder holds ------------------------------------------------------------
    def config(self) -> dict:
        """What decides the generated inputs; a reused folder must have been made for the same."""
        return {"version": DATA_VERSION, "preset": vars(self.preset), "dtype": self.dtype,
                "sparse": self.sparse}

    def stamp(self) -> dict:
        path = self.data / STAMP
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_reusable(self) -> None:
        found = self.stamp()
        if not found:
            if any(p.name != STAMP for p in self.data.iterdir()):
                raise SystemExit(f"bench: {self.data} holds files the bench did not make; give "
                                 "--reuse an empty, new or earlier --reuse folder")
            return
        if found.get("config") != self.config():
            raise SystemExit(f"bench: {self.data} holds inputs for {found.get('config')}, not "
                             f"{self.config()}: give another --reuse folder, or delete it")

    def made(self, piece: str) -> bool:
        return piece in self.stamp().get("made", []) and self.folders.get(piece, self.base).exists()

    def record(self, piece: str) -> None:
        """Note a finished input in the folder's stamp (written last, so a killed setup redoes it)."""
        stamp = self.stamp() or {"config": self.config(), "made": []}
        stamp["made"] = sorted(set(stamp["made"]) | {piece})
        tmp = self.data / (STAMP + ".tmp")
        tmp.write_text(json.dumps(stamp, indent=1))
        tmp.replace(self.data / STAMP)

    # -- setup -------------------------------------------------------------------------------
    def needed(self) -> set[str]:
        pieces = {"base", "delta"}
        for run in self.runs:
            if run != "o" or self.llama_quantize:  # run o is skipped without llama-quantize
                pieces.update(RUN_INPUTS[run])
        if any(r in XOR_ZSTD_RUNS for r in self.runs):
            pieces.add("xor")
        return pieces

    def disk_needed(self) -> int:
        """Bytes of disk the inputs still to make and one output take at their peak."""
        n = self.model_bytes
        todo = [p for p in self.needed() | {"target"}
                if not self.made(p) and p not in ADAPTER_RUNS.values()]  # adapters are small
        if self.sparse:  # dense deltas and f16 GGUF, then OUT
            return n * sum(p in ("delta", "xor", "gguf16") for p in todo) + n
        return n * len(todo) + n

    def setup(self) -> None:
        need = self.needed()
        models = not (self.made("base") and self.made("target"))
        adapters = [a for a in ADAPTER_RUNS.values() if a in need and not self.made(a)]
        if models or adapters:
            what = (["base and target"] if models else []) + (
                [f"adapters ({', '.join(adapters)})"] if adapters else [])
            say(f"generating {' and '.join(what)} ({self.model_bytes / 1e9:.2f} GB a model"
                f"{', sparse' if self.sparse else ''}) in {self.data}")
            if models:
                for folder in (self.base, self.target):
                    shutil.rmtree(folder, ignore_errors=True)
            for a in adapters:
                shutil.rmtree(self.folders[a], ignore_errors=True)
            spec = {"preset": vars(self.preset), "dtype": self.dtype, "sparse": self.sparse,
                    "models": [str(self.base), str(self.target)] if models else [],
                    "adapters": {a: str(self.folders[a]) for a in adapters}}
            m = measure(self.child("generate", spec), self.data / "setup-generate.log")
            if m.returncode != 0:
                raise SystemExit(f"bench: generating the inputs failed: {m.last_error}")
            say(f"  done in {m.wall:.1f} s")
            if models:
                self.record("base")
                self.record("target")
                for piece in ("delta", "xor", "xorz", "meta", "gguf16"):  # made from the old models
                    self.unrecord(piece)
            for a in adapters:
                self.record(a)
        if set(self.runs) & set(GGUF_RUNS) and not (self.base / "tokenizer.model").is_file():
            write_tokenizer(self.base)  # GGUF output needs one; small, so made whenever missing
        if not self.made("delta"):
            say("making the additive delta (deltamerge make-delta)")
            err = self._make_delta(self.delta, "add")
            if err:
                raise SystemExit(f"bench: make-delta failed, nothing to measure: {err}")
            self.record("delta")
        if "xor" in need and not self.made("xor"):
            say("making the XOR delta (deltamerge make-delta --kind xor)")
            err = self._make_delta(self.xor, "xor")
            if err:
                self.setup_errors["f"] = f"failed: setup make-delta --kind xor: {err}"
            else:
                self.record("xor")
        if "xorz" in need and not self.made("xorz"):
            say("making the compressed XOR delta (deltamerge make-delta --kind xor --compress)")
            err = self._make_delta(self.xorz, "xor", "--compress")
            if err:
                self.setup_errors["l"] = f"failed: setup make-delta --kind xor --compress: {err}"
            else:
                self.record("xorz")
        if "gguf16" in need and not self.made("gguf16"):
            say("writing the f16 GGUF of run b's result (llama-quantize's input in run o)")
            for folder in (self.gguf16, self.out):
                shutil.rmtree(folder, ignore_errors=True)
            # Written as OUT, the name run n writes to (GGUF's general.name is the folder's), so
            # that llama-quantize's file is byte for byte run n's.
            cmd = ["-m", "deltamerge", "apply", *map(str, (self.base, self.delta, self.out)),
                   "--quiet", "--format", "gguf", "--outtype", "f16"]
            m = measure(cmd, self.data / "setup-gguf-f16.log")
            if m.returncode != 0:
                shutil.rmtree(self.out, ignore_errors=True)
                self.setup_errors["o"] = f"failed: setup f16 GGUF: {m.last_error}"
            else:
                self.out.rename(self.gguf16)
                self.record("gguf16")
        if "meta" in need and not self.made("meta"):
            say("writing the base again in Meta's layout (2 model-parallel shards)")
            shutil.rmtree(self.meta, ignore_errors=True)
            spec = {"preset": vars(self.preset), "base": str(self.base), "out": str(self.meta),
                    "shards": 2}
            m = measure(self.child("meta", spec), self.data / "setup-meta.log")
            if m.returncode != 0:
                self.setup_errors["h"] = f"failed: setup Meta layout: {m.last_error}"
            else:
                self.record("meta")
        if "target" not in need and not self.sparse and not self.reuse:
            shutil.rmtree(self.target)
        for arch in self.archs:
            if not self.made(arch_piece(arch)):
                self.setup_architecture(arch)
        os.sync()

    def setup_architecture(self, arch: str) -> None:
        """One architecture's base and additive delta (its target made, then removed)."""
        folder = self.folders[arch_piece(arch)]
        key = f"i:{arch}"
        shutil.rmtree(folder, ignore_errors=True)
        label = ARCHITECTURES[arch].label
        say(f"generating the {label} base and target (transformers' config class, "
            f"{ARCHITECTURES[arch].tokenizer} tokenizer) in {folder}")
        folder.mkdir(parents=True)
        base, target, delta = folder / "base", folder / "target", folder / "delta"
        spec = {"preset": vars(self.preset), "dtype": self.dtype, "sparse": self.sparse, "arch": arch,
                "llamacpp": str(self.llamacpp), "base": str(base), "target": str(target)}
        m = measure(self.child("architecture", spec), self.data / f"setup-{arch}.log")
        lines = m.stdout.strip().splitlines()
        report = json.loads(lines[-1]) if m.returncode == 0 and lines else {}
        if "refused" in report:
            self.setup_errors[key] = f"skipped: deltamerge refuses {label}'s GGUF today: {report['refused']}"
        elif "disk" in report:
            self.setup_errors[key] = (f"skipped: making its inputs takes {report['disk'] / 1e9:.1f} GB "
                                      f"of disk (base, target and delta), {report['free'] / 1e9:.1f} GB free")
        elif m.returncode != 0:
            self.setup_errors[key] = f"failed: setup {label} inputs: {m.last_error}"
        else:
            say(f"  done in {m.wall:.1f} s ({report['bytes'] / 1e9:.2f} GB a model, {report['vocab']} "
                "tokens); making its additive delta")
            err = self._make_delta(delta, "add", base=base, target=target)
            if err:
                self.setup_errors[key] = f"failed: setup make-delta of {label}: {err}"
            else:
                shutil.rmtree(target)
                self.record(arch_piece(arch))
                return
        say(f"  {key}: {self.setup_errors[key]}")
        shutil.rmtree(folder, ignore_errors=True)

    def unrecord(self, piece: str) -> None:
        stamp = self.stamp()
        if piece in stamp.get("made", []):
            stamp["made"].remove(piece)
            (self.data / STAMP).write_text(json.dumps(stamp, indent=1))

    def _make_delta(self, out: Path, kind: str, *options: str, base: Path | None = None,
                    target: Path | None = None) -> str | None:
        shutil.rmtree(out, ignore_errors=True)
        cmd = self.deltamerge("make-delta", base or self.base, target or self.target, out, "--kind", kind,
                              *options)
        m = measure(cmd, self.data / f"setup-{out.name}.log")
        if m.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            return m.last_error or f"exit status {m.returncode}"
        if self.sparse and not options:  # compressed frames are small already, and not zeros
            sparsify(out)
        return None

    # -- the runs ----------------------------------------------------------------------------
    def slots(self) -> list[tuple[str, int | None, str | None]]:
        """Each run with each --threads (the runs that have no compute pool once), run i on the
        LLaMA inputs and then on each --arch, in the order a round measures them."""
        return [(r, t, a) for r in self.runs for a in ([None, *self.archs] if r == "i" else [None])
                for t in ([None] if r in NO_THREADS else self.threads)]

    def deltamerge(self, command: str, *args, threads: int | None = None) -> list[str]:
        return ["-m", "deltamerge", command, *map(str, args), "--quiet",
                "--max-shard-size", self.shard, *self.workers, *threads_option(threads)]

    def child(self, mode: str, spec: dict) -> list[str]:
        return ["--child", mode, json.dumps(spec)]

    def command(self, run: str, threads: int | None = None, arch: str | None = None) -> tuple[list[str], int]:
        """The command of a run (with ``--threads``, on ``arch``'s inputs) and the bytes of input
        it reads."""
        folder = self.folders[arch_piece(arch)] if arch else None
        base_dir, delta_dir = (folder / "base", folder / "delta") if folder else (self.base, self.delta)
        base = weight_files(base_dir)
        delta = weight_files(delta_dir)
        reads = files_bytes(base) + files_bytes(delta)
        if run == "a":
            needed = sorted({i for r in self.runs for i in RUN_INPUTS[r]} & self.needed())
            needed += [arch_piece(a) for a in self.archs if self.made(arch_piece(a))]
            spec = {"reads": {i: [str(f) for f in files_of(self.folders[i])] for i in needed},
                    "write": str(self.data / "floor.bin"), "bytes": self.model_bytes}
            return self.child("floor", spec), reads
        if run == "b":
            return self.deltamerge("apply", self.base, self.delta, self.out, threads=threads), reads
        if run == "c":
            return self.deltamerge("apply", self.base, self.delta, self.out, "--no-verify",
                                   threads=threads), reads
        if run == "d":
            target = files_bytes(weight_files(self.target))
            return self.deltamerge("make-delta", self.base, self.target, self.out), files_bytes(base) + target
        if run in APPLIED:
            folder = self.folders[APPLIED[run]]
            return (self.deltamerge("apply", self.base, folder, self.out, threads=threads),
                    files_bytes(base) + files_bytes(weight_files(folder)))
        if run == "k":
            target = files_bytes(weight_files(self.target))
            return self.deltamerge("make-delta", self.base, self.target, self.out, "--kind", "xor",
                                   "--compress"), files_bytes(base) + target
        if run == "h":
            meta = sorted(self.meta.glob("consolidated.*.pth"))
            return self.deltamerge("convert", self.meta, self.out, threads=threads), files_bytes(meta)
        if run == "o":
            f16 = sorted(self.gguf16.glob("*.gguf"))
            cmd = [str(self.llama_quantize), *map(str, f16[:1]), str(self.out / "out.gguf"),
                   self.outtype.upper(), str(self.quantize_threads(threads))]
            return cmd, files_bytes(f16)
        if run in FORMAT_RUNS or run == "n":
            fmt = FORMAT_RUNS.get(run, ["--format", "gguf", "--outtype", self.outtype])
            cmd = ["-m", "deltamerge", "apply", *map(str, (base_dir, delta_dir, self.out)),
                   "--quiet", *fmt, *self.workers, *threads_option(threads)]
            return cmd, reads
        spec = {"base": list(map(str, base)), "delta": list(map(str, delta)), "out": str(self.out)}
        return self.child("naive", spec), reads

    def quantize_threads(self, threads: int | None) -> int:
        """llama-quantize's thread count: deltamerge's, whose default is the machine's cores."""
        return threads or os.cpu_count() or 1

    def skip_reason(self, run: str, arch: str | None = None) -> str | None:
        key = f"{run}:{arch}" if arch else run
        if key in self.setup_errors:
            return self.setup_errors[key]
        if run == "o" and not self.llama_quantize:
            return "skipped: no --llama-quantize PATH given (llama.cpp's build/bin/llama-quantize)"
        if run == "g":
            need, have = 3 * self.model_bytes, 0.7 * mem_total()
            if need >= have:
                return (f"skipped: does not fit (3 x {self.model_bytes / 1e9:.1f} GB >= 70% of "
                        f"{mem_total() / 2**30:.0f} GiB RAM)")
        return None

    def inputs(self) -> list[Path]:
        return [f for f in self.folders.values() if f.exists()]

    def floor_of(self, run: str, round_floor: dict, written: int, arch: str | None = None) -> float:
        """A run's floor in one round: its inputs' reads, and its result's size written."""
        inputs = (arch_piece(arch),) if arch else RUN_INPUTS[run]
        reads = sum(round_floor["reads"][i]["seconds"] for i in inputs)
        write = round_floor["write"]
        return reads + write["seconds"] * written / max(write["bytes"], 1)

    def measure_all(self, repeat: int) -> list[RunResult]:
        results = {slot: RunResult(*slot) for slot in self.slots()}
        for (r, _, a), res in results.items():
            reason = self.skip_reason(r, a)
            if reason:
                res.status = reason
            if r in ("n", "o"):
                res.extra["outtype"] = self.outtype
            if a:
                res.extra["widths"] = ARCHITECTURES[a].widths
        for i in range(repeat):
            floor = None
            for (r, t, a), res in results.items():
                if res.status != "ok":
                    continue
                cmd, reads = self.command(r, t, a)
                shutil.rmtree(self.out, ignore_errors=True)
                if r == "o":  # llama-quantize writes a file: its folder must be there
                    self.out.mkdir()
                drop_cache(self.inputs())
                m = measure(cmd, self.data / f"run-{res.tag()}.log", program=r == "o")
                if m.returncode != 0:
                    res.status = f"failed: {m.last_error or f'exit status {m.returncode}'}"
                    say(f"  {res.tag():<4} {RUNS[r]:<22} {res.status}")
                    continue
                res.peak_rss.append(m.peak_rss)
                res.cpus.append(m.cpu)
                if m.peak_source != "VmHWM":
                    res.peak_source = m.peak_source
                if r == "a":
                    floor = json.loads(m.stdout)
                    self.floor_rounds.append(floor)
                    (self.data / "floor.bin").unlink(missing_ok=True)
                    written = self.model_bytes
                    res.walls.append(self.floor_of("a", floor, written))
                    res.extra = {"o_direct": floor["direct"], "components": floor}
                else:
                    res.walls.append(m.wall)
                    written = folder_bytes(self.out)
                if r in XOR_ZSTD_RUNS:
                    res.extra["size_ratio_to_xor"] = self.size_ratio_to_xor(
                        self.out if r == "k" else self.xorz)
                if r == "o":
                    res.extra["llama_quantize_threads"] = self.quantize_threads(t)
                res.bytes_read, res.bytes_written = reads, written
                if floor is not None:
                    res.floors.append(self.floor_of(r, floor, written, a))
                shown = res.walls[-1]
                say(f"  {res.tag():<4} {RUNS[r]:<22} {i + 1}/{repeat}: {shown:7.2f} s  "
                    f"peak {m.peak_rss / 2**20:6.0f} MiB  cpu {m.cpu:6.1f} s")
        shutil.rmtree(self.out, ignore_errors=True)
        self.add_time_ratios(results)
        return list(results.values())

    def add_time_ratios(self, results: dict[tuple[str, int | None, str | None], RunResult]) -> None:
        """Each run's median over its reference run's (RATIO_TO) at the same --threads, and over
        its own at the first --threads when several were given; run i on another architecture,
        its time per byte written over run i's on the LLaMA inputs (per_byte_ratio_to_llama)."""
        first = self.threads[0]

        def ratio(res: RunResult, ref: RunResult | None, per_byte: bool = False) -> float | None:
            if ref is None or not res.walls or not ref.walls:
                return None
            scale = ref.bytes_written / res.bytes_written if per_byte else 1
            return round(statistics.median(res.walls) / statistics.median(ref.walls) * scale, 3)

        for (r, t, a), res in results.items():
            if r in RATIO_TO and (value := ratio(res, results.get((RATIO_TO[r], t, None)))) is not None:
                res.extra[f"time_ratio_to_{RATIO_TO[r]}"] = value
            if t != first and (value := ratio(res, results.get((r, first, a)))) is not None:
                res.extra[f"time_ratio_to_threads_{first}"] = value
            if a and (value := ratio(res, results.get((r, t, None)), per_byte=True)) is not None:
                res.extra["per_byte_ratio_to_llama"] = value

    def size_ratio_to_xor(self, compressed: Path) -> float | None:
        """A compressed XOR delta's weight files over the plain XOR delta's, of the same pair."""
        plain = files_bytes(weight_files(self.xor)) if self.made("xor") else 0
        return round(files_bytes(weight_files(compressed)) / plain, 4) if plain else None


def arch_piece(arch: str) -> str:
    """The input folder of an architecture's base/ and delta/ (and its name in the stamp)."""
    return f"arch-{arch}"


def threads_option(threads: int | None) -> list[str]:
    return ["--threads", str(threads)] if threads else []


def files_of(folder: Path) -> list[Path]:
    """Every file of an input folder, as the floor reads it (weights, index, configs)."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


# -- children --------------------------------------------------------------------------------------
def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory (an anonymous mapping), as O_DIRECT transfers need."""
    return mmap.mmap(-1, size)


def open_direct(path: str, flags: int) -> tuple[int, bool]:
    """``path`` opened past the page cache, or through it where the filesystem refuses (tmpfs)."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def read_once(path: str, view: memoryview) -> tuple[int, bool]:
    """Read a whole file in large aligned blocks past the page cache; its size and whether
    O_DIRECT held. The last block comes back short, at the end of the file."""
    fd, direct = open_direct(path, os.O_RDONLY)
    size, offset = os.fstat(fd).st_size, 0
    try:
        while offset < size:
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                break
            offset += got
            if offset % ALIGN and offset < size:  # a short read inside the file: finish plainly
                os.close(fd)
                fd, direct = os.open(path, os.O_RDONLY), False
    finally:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return offset, direct


def write_once(path: str, nbytes: int, view: memoryview) -> bool:
    """Write ``nbytes`` in large aligned blocks past the page cache, then fsync."""
    fd, direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        done = 0
        while done < nbytes:  # O_DIRECT wants whole blocks: the last is rounded up, then cut
            want = min(len(view), -(-(nbytes - done) // ALIGN) * ALIGN)
            done += os.pwrite(fd, view[:want], done)
        os.ftruncate(fd, nbytes)
        os.fsync(fd)
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return direct


def child_floor(spec: dict) -> None:
    """The disk's floor: each input read once, then a file of the result's size written, each
    past the page cache, one after the other; prints the time of each as JSON."""
    buf = aligned_buffer(DIRECT_BLOCK)
    for at in range(0, DIRECT_BLOCK, 1 << 20):  # not zeros: no disk may compress them
        buf[at : at + (1 << 20)] = os.urandom(1 << 20)
    view = memoryview(buf)
    report: dict = {"reads": {}, "direct": True}
    for label, paths in spec["reads"].items():
        start, total = time.perf_counter(), 0
        for path in paths:
            got, direct = read_once(path, view)
            total += got
            report["direct"] &= direct
        report["reads"][label] = {"bytes": total, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    report["direct"] &= write_once(spec["write"], spec["bytes"], view)
    report["write"] = {"bytes": spec["bytes"], "seconds": time.perf_counter() - start}
    print(json.dumps(report))


def child_naive(spec: dict) -> None:
    """What users write by hand: both state dicts in memory, add, save (then fsync, for fairness)."""
    from safetensors.torch import load_file, save_file

    base, delta = {}, {}
    for path in spec["base"]:
        base.update(load_file(path))
    for path in spec["delta"]:
        delta.update(load_file(path))
    merged = {name: base[name] + delta[name] for name in base}
    out = Path(spec["out"])
    out.mkdir(parents=True)
    for path in spec["base"]:
        names = load_names(path)
        target = out / Path(path).name
        save_file({n: merged[n] for n in names}, target, metadata=META)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def load_names(path: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


# -- reporting -------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def row_name(row: dict) -> str:
    """``e LoRA merge r=64``, with ``@N`` after the letter for a run with --threads N and
    ``:ARCH`` before it for run i on another architecture."""
    arch = f":{row['arch']}" if row.get("arch") else ""
    at = f"@{row['threads']}" if row.get("threads") else ""
    return f"{row['run']}{arch}{at} {row['label']}"


def ratio_lines(rows: list[dict]) -> list[str]:
    """The size and time ratios, one sentence each."""
    lines = []
    for row in rows:
        name = row_name(row).split(" ", 1)[0]
        if row.get("size_ratio_to_xor") is not None:
            lines.append(f"{name}: compressed XOR weights are {row['size_ratio_to_xor']:.3f} of the "
                         "plain XOR delta's")
        for key, value in row.items():
            if key.startswith("time_ratio_to_threads_"):
                lines.append(f"{name}: takes {value:.2f}x its time with --threads "
                             f"{key.rsplit('_', 1)[1]}")
            elif key == "per_byte_ratio_to_llama":
                at = f"@{row['threads']}" if row.get("threads") else ""
                lines.append(f"{name}: {row['s_per_gb_written']:.2f} s per GB of GGUF written, {value:.2f}x "
                             f"run i{at}'s (LLaMA's)")
            elif key.startswith("time_ratio_to_"):
                ref = key.rsplit("_", 1)[1]
                at = f"@{row['threads']}" if row.get("threads") else ""
                lines.append(f"{name}: takes {value:.2f}x run {ref}{at}'s time ({RUNS[ref]})")
    return lines


def table(rows: list[dict]) -> str:
    head = (f"{'run':<40}{'median s':>10}{'floor s':>9}{'x floor':>9}{'peak RSS MiB':>14}"
            f"{'GB/s':>8}{'s/GB out':>9}{'cpu s':>8}  status")
    lines = [head, "-" * len(head)]
    for row in rows:
        name = row_name(row)
        if "median_s" in row:
            floor = f"{row['floor_s']:.2f}" if row.get("floor_s") else "-"
            ratio = f"{row['ratio_to_floor']:.2f}" if row.get("ratio_to_floor") else "-"
            cpu = f"{row['cpu_s']:.1f}" if row.get("cpu_s") is not None else "-"
            per_gb = f"{row['s_per_gb_written']:.2f}" if row.get("s_per_gb_written") else "-"
            lines.append(f"{name:<40}{row['median_s']:>10.2f}{floor:>9}{ratio:>9}{row['peak_rss_mib']:>14.0f}"
                         f"{row['gb_per_s']:>8.2f}{per_gb:>9}{cpu:>8}  {row['status']}")
        else:
            dashes = "".join(f"{'-':>{w}}" for w in (10, 9, 9, 14, 8, 9, 8))
            lines.append(f"{name:<40}{dashes}  {row['status']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        say(f"--plot: matplotlib is not installed; no chart written to {path} "
            "(pip install matplotlib to get one)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "median_s" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([row_name(r).replace(" ", "\n", 1) for r in done], [r["median_s"] for r in done])
    for bar, r in zip(bars, done):
        ratio = f" (x{r['ratio_to_floor']:.2f})" if r.get("ratio_to_floor") else ""
        label = f"{r['median_s']:.1f} s{ratio}\n{r['peak_rss_mib']:.0f} MiB"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max([r["median_s"] for r in done], default=1) * 1.25)
    ax.set_ylabel("median wall seconds (x: ratio to its disk floor)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    say(f"chart written to {path}")


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="Model widths: tiny, 7b, 13b, 65b (65b: use --sparse --layers 4).")
    ap.add_argument("--layers", type=int, help="Fewer (or more) layers than the preset's.")
    ap.add_argument("--sparse", action="store_true",
                    help="All-zero inputs that take no disk: for memory at full scale, not speed.")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--data", type=Path, help="Where to put the files (default: a temp dir in "
                    "bench-data/), removed at the end unless --keep.")
    ap.add_argument("--reuse", type=Path, metavar="DIR",
                    help="Keep the generated inputs in DIR and reuse them when DIR already holds "
                         "them for the same preset, layers, dtype, shard size and --sparse.")
    ap.add_argument("--keep", action="store_true", help="Keep the generated files.")
    ap.add_argument("--repeat", type=int, default=3,
                    help="Rounds (each runs every selected run once, in turn); figures are medians.")
    ap.add_argument("--runs", default=",".join(RUNS),
                    help=f"Subset of {','.join(RUNS)} (the list above; default: all).")
    ap.add_argument("--workers", type=int, help="Passed to deltamerge.")
    ap.add_argument("--threads", metavar="N[,M...]",
                    help="deltamerge's --threads (its compute pool: LoRA products, quantization), "
                         "passed to every run that has one, and llama-quantize's; several "
                         "(1,2) measure each such run at each, in the same rounds (default: "
                         "not passed: the machine's cores).")
    ap.add_argument("--outtype", choices=("q8_0", *QUANTIZED_OUTTYPES), default="q4_k_m",
                    help="GGUF type of runs n and o (default q4_k_m).")
    ap.add_argument("--llama-quantize", type=Path, metavar="PATH",
                    help="llama.cpp's llama-quantize binary, for run o (skipped without it).")
    ap.add_argument("--arch", metavar="NAME[,NAME...]",
                    help="Run i on these architectures too (or all), each against run i on the "
                         f"LLaMA inputs: {','.join(ARCHITECTURES)} (the list above).")
    ap.add_argument("--llamacpp", type=Path, metavar="DIR", default=os.environ.get("DELTAMERGE_LLAMACPP"),
                    help="The llama.cpp folder scripts/fetch_llamacpp.sh extracts, whose vocab GGUFs "
                         "are --arch's tokenizers (default: $DELTAMERGE_LLAMACPP).")
    ap.add_argument("--shard-size", help="Shard size of every checkpoint (default: the preset's).")
    ap.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    ap.add_argument("--plot", metavar="FILE.png", help="Draw a bar chart (needs matplotlib).")
    args = ap.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        ap.error(f"--runs: unknown run(s) {','.join(unknown)}; choose from {','.join(RUNS)}")
    args.runs = sorted(set(runs))
    if args.repeat < 1 or (args.layers is not None and args.layers < 1):
        ap.error("--repeat and --layers must be at least 1")
    if args.reuse is not None and args.data is not None:
        ap.error("--reuse DIR is where the data goes: give it or --data, not both")
    if args.threads is not None:
        try:
            args.threads = list(dict.fromkeys(int(t) for t in args.threads.split(",")))
        except ValueError:
            args.threads = []
        if not args.threads or min(args.threads) < 1:
            ap.error("--threads: one or more whole numbers of at least 1, comma-separated")
    archs = [a.strip() for a in (args.arch or "").split(",") if a.strip()]
    archs = list(ARCHITECTURES) if archs == ["all"] else list(dict.fromkeys(archs))
    if unknown := [a for a in archs if a not in ARCHITECTURES]:
        ap.error(f"--arch: unknown architecture(s) {','.join(unknown)}; choose from "
                 f"{','.join(ARCHITECTURES)} or all")
    if archs and "i" not in args.runs:
        ap.error("--arch: the architectures are measured by run i; add i to --runs")
    if archs and not (args.llamacpp and (Path(args.llamacpp) / "models").is_dir()):
        ap.error("--arch needs llama.cpp's vocab GGUFs: give --llamacpp DIR, or export "
                 "DELTAMERGE_LLAMACPP=$(scripts/fetch_llamacpp.sh)")
    args.arch = archs
    args.llamacpp = Path(args.llamacpp).resolve() if args.llamacpp else None
    if args.llama_quantize is not None and not (
            args.llama_quantize.is_file() and os.access(args.llama_quantize, os.X_OK)):
        ap.error(f"--llama-quantize: {args.llama_quantize} is not an executable file")
    return args


def make_data_dir(args: argparse.Namespace) -> Path:
    if args.reuse is not None:
        data = args.reuse.resolve()
        data.mkdir(parents=True, exist_ok=True)
        return data
    if args.data is None:
        parent = ROOT / "bench-data"
        parent.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{args.preset}-", dir=parent))
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    if any(data.iterdir()):
        raise SystemExit(f"bench: {data} is not empty; give an empty or new folder to --data, "
                         "or --reuse it")
    return data


def clean(data: Path, whole: bool) -> None:
    """Remove what the run generated: the temp dir, or the contents of the --data folder."""
    if whole:
        shutil.rmtree(data, ignore_errors=True)
        return
    for path in data.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--peak"]:
        return run_reporting_peak(argv[1:])
    if argv[:1] == ["--child"]:
        children = {"floor": child_floor, "naive": child_naive, "generate": child_generate,
                    "meta": child_meta, "architecture": child_architecture}
        children[argv[1]](json.loads(argv[2]))
        return 0
    args = parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    data = make_data_dir(args)
    try:
        bench = Bench(args, data)
        if bench.reuse:
            bench.check_reusable()
        machine = dict(host(), disk_free_bytes=shutil.disk_usage(data).free)
        if bench.disk_needed() > machine["disk_free_bytes"] - 2 * 10**9:
            raise SystemExit(f"bench: needs about {bench.disk_needed() / 1e9:.1f} GB of disk, "
                             f"{machine['disk_free_bytes'] / 1e9:.1f} GB free under {data}")
        bench.setup()
        results = bench.measure_all(args.repeat)
    finally:
        if not args.keep and args.reuse is None:
            clean(data, whole=args.data is None)
    rows = [r.summary() for r in results]
    config = {"preset": args.preset, "layers": bench.preset.layers, "dtype": args.dtype,
              "sparse": args.sparse, "model_bytes": bench.model_bytes, "shard_size": bench.shard,
              "repeat": args.repeat, "workers": args.workers, "threads": args.threads,
              "outtype": args.outtype, "arch": args.arch,
              "llama_quantize": str(args.llama_quantize) if args.llama_quantize else None,
              "reused": str(data) if args.reuse is not None else None}
    if args.json:
        print(json.dumps({"command": command, "machine": machine, "config": config,
                          "note": FLOOR_NOTE, "runs": rows}, indent=2))
    else:
        print(f"command: {command}")
        print(f"machine: {machine['cpu']}, {machine['cores']} cores, "
              f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM, "
              f"{machine['disk_free_bytes'] / 1e9:.0f} GB disk free")
        print(f"model:   {args.preset}, {bench.preset.layers} layers, {args.dtype}, "
              f"{bench.model_bytes / 1e9:.2f} GB{', sparse' if args.sparse else ''}; "
              f"median of {args.repeat} alternating rounds, inputs evicted from the page cache "
              "before each run; peak RSS is each run's own VmHWM; "
              f"--threads {','.join(map(str, args.threads)) if args.threads else 'not passed'}")
        print(table(rows))
        for line in ratio_lines(rows):
            print(line)
        print(FLOOR_NOTE)
        if any(r.get("o_direct") is False for r in rows):
            print("note: this filesystem refused O_DIRECT; the floor went through the page cache")
    if args.plot:
        plot(rows, args.plot, f"deltamerge, {args.preset} x{bench.preset.layers} layers "
                              f"({bench.model_bytes / 1e9:.2f} GB{', sparse' if args.sparse else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
