#!/usr/bin/env python
"""Compare deltamerge's GGUF with llama.cpp's ``convert_hf_to_gguf.py``, byte for byte.

llama.cpp's converter is not a dependency: get it from the llama-cpp-python source distribution
(``pip download --no-deps --no-binary :all: llama-cpp-python``, then ``vendor/llama.cpp/``) and
point ``--convert`` at it. For each outtype, the converter writes its file(s) from the Hugging
Face folder, and deltamerge plans the same from the folder's config and tokenizer and streams the
weights through :class:`GGUFStreamWriter` in a shuffled order and random blocks of rows.

The quantized outtypes (q4_k_m, q5_0...) are compared with what llama.cpp's ``llama-quantize``
(built from the same source: ``cmake --build build --target llama-quantize``) writes from the
converter's file at the model's own dtype; deltamerge quantizes on ``--threads`` threads.

    python scripts/gguf_vs_llamacpp.py --convert .../convert_hf_to_gguf.py MODEL --outtype f16,q8_0
    python scripts/gguf_vs_llamacpp.py --convert .../convert_hf_to_gguf.py \
        --quantize .../build/bin/llama-quantize MODEL --outtype q4_k_m,q6_k,q4_0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

from deltamerge.dtypes import SAFETENSORS_TO_TORCH as DTYPES
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf
from deltamerge.sinks.gguf_types import OUTTYPES as QUANTIZED


def weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def ours(folder: Path, outtype: str, out: Path, split: int, seed: int, threads: int = 1) -> list[str]:
    handles = {f: safe_open(folder / f, "pt") for f in weight_files(folder)}
    groups = [list(h.keys()) for h in handles.values()]
    where = {name: h for h in handles.values() for name in h.keys()}
    listed = [(name, DTYPES[h.get_slice(name).get_dtype()], tuple(h.get_slice(name).get_shape()))
              for name, h in where.items()]
    plan = plan_gguf(folder, listed, outtype=outtype, hf_files=groups, split_max_size=split)
    rnd = random.Random(seed)
    names = list(where)
    rnd.shuffle(names)
    with GGUFStreamWriter(plan, out, threads=threads) as writer:
        for name in names:
            t = where[name].get_tensor(name)
            r = 0
            while r < t.shape[0]:
                r1 = min(t.shape[0], r + rnd.randint(1, 64))
                writer.write_rows(name, r, r1, t[r:r1])
                r = r1
    return [f.name for f in plan.files]


def reference(convert: Path, folder: Path, outtype: str, out: Path, split: int) -> list[str]:
    args = [sys.executable, str(convert), str(folder), "--outfile", f"{out}/", "--outtype", outtype]
    if split:
        args += ["--split-max-size", str(split)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-4000:]}")
    return sorted(os.listdir(out))


def own_dtype(folder: Path) -> str:
    """The converter's outtype for the model's own dtype (its first tensor of 2+ dimensions)."""
    for f in weight_files(folder):
        with safe_open(folder / f, "pt") as h:
            for name in h.keys():
                s = h.get_slice(name)
                if len(s.get_shape()) >= 2:
                    return {"F32": "f32", "BF16": "bf16"}.get(s.get_dtype(), "f16")
    return "f16"


def quantized(convert: Path, quantize: Path, folder: Path, outtype: str, out: Path, name: str) -> list[str]:
    """llama-quantize's file from the converter's at the model's own dtype, named ``name``."""
    source = out / "converted"
    source.mkdir()
    converted = reference(convert, folder, own_dtype(folder), source, 0)
    proc = subprocess.run([str(quantize), str(source / converted[0]), str(out / name), outtype.upper()],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-quantize failed:\n{proc.stderr[-4000:]}")
    (source / converted[0]).unlink()
    source.rmdir()
    return [name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--convert", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--outtype", default="f32,f16,bf16,q8_0")
    parser.add_argument("--quantize", type=Path, help="llama.cpp's llama-quantize (quantized outtypes)")
    parser.add_argument("--threads", type=int, default=2, help="deltamerge's quantizing threads")
    parser.add_argument("--split-max-size", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    same = True
    for outtype in args.outtype.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            theirs_dir, ours_dir = Path(tmp, "llamacpp"), Path(tmp, "deltamerge")
            theirs_dir.mkdir()
            ours_dir.mkdir()
            model = args.model.resolve()
            mine = ours(model, outtype, ours_dir, args.split_max_size, args.seed, args.threads)
            if outtype in QUANTIZED:
                if args.quantize is None:
                    raise SystemExit(f"--outtype {outtype} needs --quantize (llama.cpp's llama-quantize)")
                theirs = quantized(args.convert, args.quantize, model, outtype, theirs_dir, mine[0])
            else:
                theirs = reference(args.convert, model, outtype, theirs_dir, args.split_max_size)
            for name in sorted(set(theirs) | set(mine)):
                a, b = theirs_dir / name, ours_dir / name
                if not (a.is_file() and b.is_file()):
                    print(f"{outtype}: {name} written by {'llama.cpp' if a.is_file() else 'deltamerge'} only")
                    same = False
                    continue
                x, y = a.read_bytes(), b.read_bytes()
                if x == y:
                    print(f"{outtype}: {name}: {len(x)} bytes identical")
                else:
                    at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                    print(f"{outtype}: {name}: differs from byte {at} ({len(x)} vs {len(y)} bytes)")
                    same = False
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
