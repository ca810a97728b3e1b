#!/usr/bin/env python
"""Run deltamerge's GGUF files in llama.cpp and compare their logits with transformers' on the
hf result: the check that a file which is byte for byte the converter's (the test suite) also
behaves as the model it was made from, in the program people run it in.

BASE and DELTA are merged twice by deltamerge: to safetensors (``--format hf``, run in
transformers at fp32) and to GGUF at each ``--outtype`` (run in llama.cpp through
llama-cpp-python). A fixed text, tokenized by llama.cpp from the GGUF, goes through both; for
each file the script prints the logits' relative RMS error against transformers', the largest
difference, how often the top token agrees, and the mean KL divergence of the next-token
distributions. A file whose relative error passes its type's bound (``BOUNDS``: what the type's
rounding explains) fails the run. How sharp that is depends on the type: on the bench's LLaMA at
7B widths the merged f16 file is 0.0003 from transformers and 0.115 from the unmerged base, so
f16 and q8_0 tell a merge from its base, while a 4-bit type's own rounding (0.107) is as large
as that delta and only a wrong file (a wrong layout, another model) stands out.

llama-cpp-python is not a dependency (its install compiles llama.cpp); any install of it works,
or the source distribution's ``llama_cpp`` package on ``PYTHONPATH`` with ``LLAMA_CPP_LIB_PATH``
naming a llama.cpp build's ``bin/`` (``cmake -B build && cmake --build build``: libllama.so):

    python scripts/gguf_logits.py BASE DELTA --outtype f16,q8_0,q4_k_m,q6_k --work /tmp/logits
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

TEXT = ("The capital of France is Paris. A merged model should answer as the model its authors "
        "published; 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.")
# Largest relative RMS error of the logits each type's rounding explains (random-weight models
# included); llama.cpp's CPU kernels also round activations to f16 (or q8 for quantized types).
BOUNDS = {"f32": 1e-3, "f16": 2e-2, "bf16": 5e-2, "q8_0": 5e-2, "q6_k": 0.1, "q5_k_m": 0.15,
          "q5_k_s": 0.15, "q5_0": 0.15, "q5_1": 0.15, "q4_k_m": 0.25, "q4_k_s": 0.25, "q4_0": 0.3,
          "q4_1": 0.3}


def merged(base: Path, delta: Path, work: Path, outtypes: list[str], threads: int | None) -> dict[str, Path]:
    """The hf result and one GGUF file per outtype (made once; a finished one is kept)."""
    from deltamerge import apply_delta

    made = {"hf": work / "hf" / "model"}
    for folder in ("hf", *outtypes):
        (work / folder).mkdir(parents=True, exist_ok=True)
    if not (made["hf"] / "deltamerge-result.json").is_file():
        apply_delta(base, delta, made["hf"], progress=False, threads=threads)
    for outtype in outtypes:
        out = work / outtype / "model"
        if not (out / "deltamerge-result.json").is_file():
            apply_delta(base, delta, out, format="gguf", outtype=outtype, progress=False, threads=threads)
        files = sorted(out.glob("*.gguf"))
        if len(files) != 1:
            raise SystemExit(f"{out}: expected one .gguf file, found {len(files)} (use a larger shard size)")
        made[outtype] = files[0]
    return made


def transformers_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].to(torch.float64)


def llama_cpp_logits(path: Path, ids: list[int], threads: int | None) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                n_threads=threads or None, n_batch=max(64, len(ids)))
    llm.eval(ids)
    logits = torch.from_numpy(llm.scores[: len(ids)].copy()).to(torch.float64)
    llm.close()
    return logits


def compare(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    vocab = min(ours.shape[1], reference.shape[1])  # a GGUF vocabulary may be padded otherwise
    ours, reference = ours[:, :vocab], reference[:, :vocab]
    log_p, log_q = reference.log_softmax(-1), ours.log_softmax(-1)
    return {
        "rel_rms": float((ours - reference).norm() / reference.norm()),
        "max_abs": float((ours - reference).abs().max()),
        "top1": float((ours.argmax(-1) == reference.argmax(-1)).double().mean()),
        "kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("delta", type=Path)
    parser.add_argument("--outtype", default="f16,q8_0,q4_k_m,q4_k_s,q5_k_m,q5_k_s,q6_k,q4_0,q4_1,q5_0,q5_1",
                        help="comma-separated GGUF outtypes (default: every one but f32 and bf16)")
    parser.add_argument("--work", type=Path, default=Path("gguf-logits"),
                        help="folder for the merged results (kept: a second run reuses them)")
    parser.add_argument("--text", default=TEXT, help="the text run through both (tokenized by llama.cpp)")
    parser.add_argument("--threads", type=int, default=None, help="deltamerge's and llama.cpp's threads")
    args = parser.parse_args(argv)
    outtypes = [t for t in args.outtype.split(",") if t]
    unknown = [t for t in outtypes if t not in BOUNDS]
    if unknown:
        parser.error(f"unknown outtype(s) {', '.join(unknown)}: one of {', '.join(BOUNDS)}")
    files = merged(args.base, args.delta, args.work, outtypes, args.threads)

    from llama_cpp import Llama

    first = Llama(model_path=str(files[outtypes[0]]), vocab_only=True, verbose=False)
    ids = first.tokenize(args.text.encode("utf-8"), add_bos=True)
    first.close()
    reference = transformers_logits(files["hf"], ids)
    print(f"{len(ids)} tokens; transformers' logits (fp32): RMS {reference.pow(2).mean().sqrt():.4f}")
    print(f"{'outtype':8} {'rel RMS':>9} {'bound':>6} {'max |diff|':>10} {'top-1':>6} {'KL':>9}  file")
    failed = []
    for outtype in outtypes:
        result = compare(llama_cpp_logits(files[outtype], ids, args.threads), reference)
        ok = math.isfinite(result["rel_rms"]) and result["rel_rms"] <= BOUNDS[outtype]
        failed += [] if ok else [outtype]
        print(f"{outtype:8} {result['rel_rms']:9.5f} {BOUNDS[outtype]:6.3f} {result['max_abs']:10.4f} "
              f"{result['top1']:6.1%} {result['kl']:9.2e}  {files[outtype]}{'' if ok else '  FAILED'}")
    if failed:
        print(f"beyond their bounds: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
