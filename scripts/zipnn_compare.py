#!/usr/bin/env python3
"""Compressed XOR deltas against zipnn's delta mode, on one real base/fine-tune pair (issue 24).

    python scripts/zipnn_compare.py /work/zipdata/pair/base-bf16 /work/zipdata/pair/target-bf16 \\
        --work /work/zipdata/cmp-bf16 --zipnn-python /work/zipdata/venv/bin/python

BASE and TARGET are safetensors folders with the same tensors in the same layout (as
``scripts/real_finetune_pair.py`` writes them). Measures, and prints as a table and as JSON:

- how much the fine-tune changed: the fraction of elements whose bits differ, and the fraction
  whose high byte (the sign, then bf16's top 7 exponent bits or fp16's 5 and 2 of its
  mantissa) differs;
- ``deltamerge make-delta BASE TARGET OUT --kind xor`` and ``... --kind xor --compress``: the
  delta folders' sizes and the time to make them;
- ``deltamerge apply BASE DELTA OUT`` of each: the median of ``--repeats`` runs, the two kinds
  alternating (the page cache is not dropped: the inputs stay cached after the first run);
- zipnn (``ZipNN(delta_compressed_type="file")``: the whole ``model.safetensors`` XORed against
  the base file, then byte-grouped and compressed): its size, its compression time and the
  median of its decompression (which rebuilds the target file and writes it). zipnn is not a
  dependency of deltamerge: it runs in a separate environment named by ``--zipnn-python``
  (``python -m venv DIR && DIR/bin/pip install zipnn torch``), which runs this file with
  ``--zipnn-worker``; that mode imports zipnn and numpy only.

Not part of the test suite; run it under ``nice``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WEIGHTS = "model.safetensors"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def changed_fraction(base: Path, target: Path) -> dict:
    """Elements whose bits differ, and those whose high byte differs, over all tensors."""
    import torch  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    total = changed = high = 0
    with safe_open(base / WEIGHTS, "pt") as fb, safe_open(target / WEIGHTS, "pt") as ft:
        for name in fb.keys():  # noqa: SIM118 (safe_open has no iterator)
            a, b = fb.get_tensor(name), ft.get_tensor(name)
            if a.element_size() != 2:
                raise SystemExit(f"{name}: {a.dtype}, this compares 16-bit checkpoints only")
            xa, xb = a.view(torch.int16), b.view(torch.int16)
            total += a.numel()
            changed += int((xa != xb).sum())
            high += int(((xa ^ xb) & -256 != 0).sum())  # -256 == 0xff00 as int16
    return {"elements": total, "changed": changed / total, "high_byte_changed": high / total}


def deltamerge_runs(base: Path, target: Path, work: Path, repeats: int) -> dict:
    cli = [sys.executable, "-m", "deltamerge"]
    res: dict = {}
    for label, extra in (("xor", []), ("xor-zstd", ["--compress"])):
        out = work / f"delta-{label}"
        res[label] = {"make_s": timed([*cli, "make-delta", str(base), str(target), str(out), "--kind", "xor",
                                       *extra, "--force", "-q"]),
                      "bytes": folder_bytes(out), "apply_s": []}
    for _ in range(repeats):
        for label in ("xor", "xor-zstd"):
            out = work / f"applied-{label}"
            res[label]["apply_s"].append(timed([*cli, "apply", str(base), str(work / f"delta-{label}"),
                                                str(out), "--force", "-q"]))
    for label in ("xor", "xor-zstd"):
        res[label]["apply_median_s"] = statistics.median(res[label]["apply_s"])
    return res


def zipnn_worker(base_file: Path, target_file: Path, out: Path, dtype: str, repeats: int) -> dict:
    """zipnn's file-XOR delta: compress TARGET against BASE, then decompress it back, timed."""
    from zipnn import ZipNN  # noqa: PLC0415 (only in the zipnn environment)

    def codec() -> ZipNN:
        return ZipNN(input_format="byte", bytearray_dtype=dtype, delta_compressed_type="file")

    start = time.perf_counter()
    data = target_file.read_bytes()
    packed = codec().compress(data, delta_second_data=str(base_file))
    out.write_bytes(packed)
    compress_s = time.perf_counter() - start
    del data, packed
    times = []
    rebuilt = out.with_suffix(".rebuilt")
    for _ in range(repeats):
        start = time.perf_counter()
        plain = codec().decompress(out.read_bytes(), delta_second_data=str(base_file))
        rebuilt.write_bytes(plain)
        times.append(time.perf_counter() - start)
        del plain
    if rebuilt.read_bytes() != target_file.read_bytes():
        raise SystemExit("zipnn's round trip differs from the target")
    rebuilt.unlink()
    return {"bytes": out.stat().st_size, "compress_s": compress_s, "decompress_s": times,
            "decompress_median_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="folder for the deltas and rebuilt models")
    ap.add_argument("--zipnn-python", type=Path,
                    help="python of an environment with zipnn (no zipnn run without it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zipnn-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.zipnn_worker:
        dtype = json.loads((args.base / "config.json").read_text()).get("torch_dtype", "bfloat16")
        res = zipnn_worker(args.base / WEIGHTS, args.target / WEIGHTS, args.work / "target.znn", dtype,
                           args.repeats)
        print(json.dumps(res))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    report = {"base": str(args.base), "target": str(args.target),
              "target_bytes": (args.target / WEIGHTS).stat().st_size,
              "changes": changed_fraction(args.base, args.target)}
    report["deltamerge"] = deltamerge_runs(args.base, args.target, args.work, args.repeats)
    if args.zipnn_python:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([str(args.zipnn_python), __file__, str(args.base), str(args.target), "--work",
                               str(args.work), "--repeats", str(args.repeats), "--zipnn-worker"],
                              check=True, capture_output=True, text=True, env=env)
        report["zipnn"] = json.loads(proc.stdout.strip().splitlines()[-1])

    dm = report["deltamerge"]
    plain = dm["xor"]["bytes"]
    ch = report["changes"]
    print(f"elements changed {ch['changed']:.1%}, high byte changed {ch['high_byte_changed']:.1%}")
    print(f"{'':22}{'bytes':>14}{'of xor':>9}{'make/compress s':>17}{'apply median s':>16}")
    print(f"{'deltamerge xor':22}{plain:>14,}{1:>9.1%}{dm['xor']['make_s']:>17.1f}"
          f"{dm['xor']['apply_median_s']:>16.1f}")
    z = dm["xor-zstd"]
    print(f"{'deltamerge xor-zstd':22}{z['bytes']:>14,}{z['bytes'] / plain:>9.1%}{z['make_s']:>17.1f}"
          f"{z['apply_median_s']:>16.1f}")
    if "zipnn" in report:
        zn = report["zipnn"]
        print(f"{'zipnn delta':22}{zn['bytes']:>14,}{zn['bytes'] / plain:>9.1%}{zn['compress_s']:>17.1f}"
              f"{zn['decompress_median_s']:>16.1f}")
    print(f"apply xor-zstd / xor: {z['apply_median_s'] / dm['xor']['apply_median_s']:.2f}x")
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
