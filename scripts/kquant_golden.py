#!/usr/bin/env python
"""Golden blocks for the k-quant port (``deltamerge/sinks/gguf_quants.py``), from llama.cpp's C code.

Compiles ``scripts/kquant_golden.c`` with ``ggml/src/ggml-quants.c`` of a llama.cpp source tree
(the one vendored in llama-cpp-python: ``pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36``, then ``vendor/llama.cpp``) as llama-quantize's ggml-base is built on
x86-64: plain ``gcc -O2 -DNDEBUG``, no ``-march``, no ``-ffast-math``, ``-ffp-contract=off``
(x86-64 without ``-march`` has no FMA; the flag keeps other hosts from contracting). It then
quantizes the rows below with ggml's ``quantize_row_*_ref`` for every type and writes, under
``tests/data/kquants``: ``CASE.f32`` (the rows, raw little-endian float32), ``CASE.TYPE.bin``
(ggml's blocks) and ``golden.json`` (the cases, the types and the build).

    python scripts/kquant_golden.py LLAMA_CPP_DIR [--out tests/data/kquants]
    python scripts/kquant_golden.py LLAMA_CPP_DIR --bench Q4_K     # throughput, C vs the port
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLAGS = ["-O2", "-DNDEBUG", "-ffp-contract=off", "-std=gnu11"]


def edge_rows() -> torch.Tensor:
    """Rows of 256 that take the C code's rarer branches."""
    g = torch.Generator().manual_seed(2)
    n = lambda: torch.randn(256, generator=g)  # noqa: E731
    rows = [
        torch.zeros(256),  # every block empty: d = 0, L kept from the scale search
        torch.full((256,), 1.5),  # max == min
        torch.full((256,), -0.25),
        n() * torch.where(torch.arange(256) % 2 == 0, 1.0, 0.0),  # half zeros
        torch.where(torch.arange(256) == 7, 1e4, n()),  # one huge value: the other blocks' scales round to 0
        torch.where(torch.arange(256) == 200, -3e4, n() * 1e-3),
        n() * 1e-30,  # tiny: below GROUP_MAX_EPS for Q6_K, products underflow
        n() * 1e-40,  # subnormal
        torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0),  # mixed signs, ties for the largest |x|
        torch.arange(256, dtype=torch.float32) - 128,  # integers: halves and ties when scaled
        (torch.arange(256, dtype=torch.float32) % 16) * 0.5,  # exactly representable steps, all >= 0
        n().abs(),  # all positive: min clamped to 0
        -n().abs(),  # all negative
        n() * 1e6,  # d beyond fp16's range for some types
        torch.where(torch.arange(256) % 32 == 0, n() * 100, n() * 1e-6),  # one big value per block
        torch.where(torch.arange(256) < 128, n(), torch.zeros(256)),  # empty blocks beside full ones
        n() * 1e38,  # max - min overflows: nearest_int beyond its range, NaN sums
    ]
    return torch.stack(rows).to(torch.float32)


def cases() -> dict[str, tuple[torch.Tensor, str]]:
    g = torch.Generator().manual_seed(1)
    return {
        "normal": (torch.randn(6, 512, generator=g), "standard normal, width 512"),
        "weights": (torch.randn(6, 512, generator=g) * 0.02, "normal * 0.02, as LLM weights, width 512"),
        "edge": (edge_rows(), "rows of 256: zeros, constants, huge, tiny, subnormal, mixed signs, ..."),
    }


def build(llama_cpp: Path, exe: Path) -> dict[str, str]:
    src = llama_cpp / "ggml" / "src"
    cmd = ["gcc", *FLAGS, f"-I{llama_cpp / 'ggml' / 'include'}", f"-I{src}",
           str(ROOT / "scripts" / "kquant_golden.c"), str(src / "ggml-quants.c"), "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True)
    cmake = (llama_cpp / "ggml" / "CMakeLists.txt").read_text()
    version = ".".join(re.search(rf"set\(GGML_VERSION_{part} (\d+)\)", cmake).group(1)
                       for part in ("MAJOR", "MINOR", "PATCH"))
    compiler = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    source = f"llama.cpp (ggml {version})"
    pkg_info = llama_cpp.parent.parent / "PKG-INFO"  # the llama-cpp-python sdist it is vendored in
    if llama_cpp.parent.name == "vendor" and pkg_info.is_file():
        pkg = re.search(r"^Version: (\S+)$", pkg_info.read_text(), re.M)
        source += f" vendored in llama-cpp-python {pkg.group(1) if pkg else '?'}"
    return {
        "source": f"{source}, ggml/src/ggml-quants.c, quantize_row_*_ref",
        "compiler": compiler.splitlines()[0],
        "flags": " ".join(FLAGS),
        "machine": platform.machine(),
    }


def quantize_c(exe: Path, qtype: str, rows: torch.Tensor, work: Path,
               repeats: int = 0) -> tuple[bytes, float]:
    src, dst = work / "in.f32", work / "out.bin"
    src.write_bytes(rows.contiguous().numpy().tobytes())
    args = [str(exe), qtype, str(rows.numel()), str(src), str(dst)] + ([str(repeats)] if repeats else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return dst.read_bytes(), float(out) if repeats else 0.0


def write_golden(exe: Path, info: dict[str, str], out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    listed = {}
    for name, (rows, what) in cases().items():
        (out / f"{name}.f32").write_bytes(rows.numpy().tobytes())
        for qtype in TYPES:
            (out / f"{name}.{qtype}.bin").write_bytes(quantize_c(exe, qtype, rows, work)[0])
        listed[name] = {"rows": rows.shape[0], "width": rows.shape[1], "what": what}
    golden = {"build": info, "types": list(TYPES), "cases": listed}
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


def bench(exe: Path, qtype: str, work: Path, rows: int, width: int, batch: int) -> None:
    """MB of f16 weights per CPU second, one thread: the C code and the port on the same rows.

    CPU seconds, not wall time, so that other work on a shared machine counts for neither.
    """
    import gguf

    from deltamerge.sinks.gguf_quants import quantize_rows

    torch.set_num_threads(1)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(3)) * 0.02
    mb = x.numel() * 2 / 1e6
    c_bytes, c_time = quantize_c(exe, qtype, x, work, repeats=3)
    c_time /= 3
    t = gguf.GGMLQuantizationType[qtype]
    start = time.process_time()
    ours = b"".join(quantize_rows(x[r:r + batch], t).numpy().tobytes() for r in range(0, rows, batch))
    py_time = time.process_time() - start
    print(f"{qtype} {rows}x{width}, {batch} rows a call: C {mb / c_time:.1f} MB/s, port {mb / py_time:.1f} "
          f"MB/s (f16 MB per CPU second, one thread); bytes equal: {ours == c_bytes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (holding ggml/src/ggml-quants.c)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "kquants")
    ap.add_argument("--bench", metavar="TYPE", help="measure throughput instead of writing goldens")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64, help="rows per quantize_rows call")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = work / "kquant_golden"
        info = build(args.llama_cpp, exe)
        if args.bench:
            bench(exe, args.bench, work, args.rows, args.width, args.batch)
        else:
            write_golden(exe, info, args.out, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
