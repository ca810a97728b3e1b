#!/usr/bin/env python3
"""``make-delta --kind lora`` against mergekit's ``mergekit-extract-lora``, on one real pair.

    nice -n 10 python scripts/mergekit_compare.py BASE TARGET --rank 16 --work DIR \\
        --mergekit /work/mk/venv/bin/mergekit-extract-lora [--repeats 3]
    python scripts/mergekit_compare.py BASE TARGET --adapter deltamerge=DIR1 --adapter mergekit=DIR2

With ``--mergekit``: runs ``deltamerge make-delta BASE TARGET DIR/deltamerge --kind lora --rank R``
and ``mergekit-extract-lora --base-model BASE --model TARGET --out-path DIR/mergekit
--max-rank R`` ``--repeats`` times each, alternating (the page cache is not dropped: the inputs
stay cached after the first run), each under ``/usr/bin/time -v``; prints each run's wall time,
CPU time (user + system) and peak RSS, and their medians. mergekit is not a dependency of
deltamerge: it lives in its own environment (``python -m venv DIR && DIR/bin/pip install
mergekit``), named by the path of its ``mergekit-extract-lora``.

Then, for the adapters just written (or the ``--adapter NAME=FOLDER`` given), per layer matrix
(q, k, v, o, gate, up, down): the relative Frobenius error ``||D - s * B @ A|| / ||D||`` of each
adapter's factors as stored (bf16 factors widened to fp32; ``s = lora_alpha / r`` from
``adapter_config.json``, its ``alpha_pattern``/``rank_pattern`` matched as peft matches them),
where ``D`` is the exact fp32 difference ``target - base``; and the optimum at the same rank
(Eckart-Young, from the singular values: ``extract_lora_check.optimum``). Per kind of matrix,
the errors pooled over the layers (``sqrt(sum of errors^2 / sum of ||D||^2)``, as make-delta's
summary pools them) and the first adapter's over the second's. Holds matrices whole (a check,
not the tool). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from extract_lora_check import KINDS, optimum, whole

from deltamerge.sources import open_checkpoint

PREFIX = "base_model.model."


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system: on a loaded machine the steadier of the two)
    and peak RSS (bytes) of ``cmd``, as ``/usr/bin/time -v`` reports them."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return parse_time_v(proc.stderr, cmd[0])


def parse_time_v(text: str, what: str) -> tuple[float, float, int]:
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if wall is None or user is None or system is None or rss is None:
        sys.exit(f"no timing in the output of {what}:\n{text[-2000:]}")
    hours, minutes, seconds = wall.groups()
    return (int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds),
            float(user.group(1)) + float(system.group(1)), int(rss.group(1)) * 1024)


def run_both(base: str, target: str, rank: int, work: Path, mergekit: str, repeats: int,
             block: str | None) -> dict[str, Path]:
    outs = {"deltamerge": work / "deltamerge", "mergekit": work / "mergekit"}
    ours = [sys.executable, "-m", "deltamerge", "make-delta", base, target, str(outs["deltamerge"]),
            "--kind", "lora", "--rank", str(rank), "--force"]
    if block:
        ours += ["--block-size", block]
    theirs = [mergekit, "--base-model", base, "--model", target, "--out-path",
              str(outs["mergekit"]), "--max-rank", str(rank)]
    runs: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for i in range(repeats):
        for name, cmd in (("deltamerge", ours), ("mergekit", theirs)):
            runs[name].append(timed(cmd))
            wall, cpu, peak = runs[name][-1]
            print(f"run {i + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS "
                  f"{peak / 2**20:.0f} MiB", flush=True)
    for name, cmd in (("deltamerge", ours), ("mergekit", theirs)):
        wall, cpu, peak = (statistics.median(column) for column in zip(*runs[name]))
        print(f"{name}: median {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS {peak / 2**20:.0f} "
              f"MiB ({len(runs[name])} runs)\n  $ {' '.join(cmd)}")
    return outs


class Adapter:
    """A peft LoRA folder's factors and the scale peft gives each module."""

    def __init__(self, folder: Path):
        self.config = json.loads((folder / "adapter_config.json").read_text())
        self.weights = open_checkpoint(folder / "adapter_model.safetensors")

    def _pattern(self, key: str, module: str, default: float) -> float:
        # peft: a pattern key matches a module whose name ends with it at a dot
        for pattern, value in (self.config.get(key) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def product(self, module: str) -> torch.Tensor | None:
        a_name, b_name = (f"{PREFIX}{module}.lora_{w}.weight" for w in "AB")
        if a_name not in self.weights.specs:
            return None
        r = self._pattern("rank_pattern", module, self.config["r"])
        alpha = self._pattern("alpha_pattern", module, self.config["lora_alpha"])
        scale = alpha / (r ** 0.5 if self.config.get("use_rslora") else r)
        return scale * (whole(self.weights, b_name) @ whole(self.weights, a_name))


def compare(base_dir: str, target_dir: str, adapters: dict[str, Path], rank: int | None) -> None:
    loaded = {name: Adapter(folder) for name, folder in adapters.items()}
    first = next(iter(loaded.values()))
    rank = rank or first.config["r"]
    names = list(loaded)
    pooled: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(names) + 2))
    print(f"\nrelative Frobenius error per matrix at rank {rank} ({', '.join(names)}, optimum)")
    with open_checkpoint(base_dir) as base, open_checkpoint(target_dir) as target:
        for name in base.specs:
            kind = next((k for k in KINDS if name.endswith(f".{k}.weight")), None)
            if kind is None:
                continue
            diff = whole(target, name) - whole(base, name)
            norm_sq = float(torch.linalg.matrix_norm(diff)) ** 2
            if norm_sq == 0:
                continue
            module = name.removesuffix(".weight")
            errors = []
            for adapter in loaded.values():
                product = adapter.product(module)
                rest = diff if product is None else diff - product
                errors.append(float(torch.linalg.matrix_norm(rest)) ** 2 / norm_sq)
            best = optimum(diff, rank)
            sums = pooled[kind]
            for i, e in enumerate([*errors, best ** 2]):
                sums[i] += e * norm_sq
            sums[-1] += norm_sq
            print(f"{module}: " + " ".join(f"{e ** 0.5:.6f}" for e in errors) + f" {best:.6f}",
                  flush=True)
    for adapter in loaded.values():
        adapter.weights.close()
    print(f"\nper kind of matrix, pooled over the layers (rank {rank})")
    columns = [*names, "optimum"]
    widths = [max(12, len(n) + 2) for n in columns]
    ratio = f"  {names[0]}/{names[1]}" if len(names) > 1 else ""
    print(f"{'kind':<10}" + "".join(f"{n:>{w}}" for n, w in zip(columns, widths)) + ratio)
    for kind in KINDS:
        if kind in pooled:
            sums = pooled[kind]
            errs = [(s / sums[-1]) ** 0.5 for s in sums[:-1]]
            line = "".join(f"{e:>{w}.6f}" for e, w in zip(errs, widths))
            if len(names) > 1:
                line += f"{errs[0] / errs[1]:>{len(ratio)}.5f}"
            print(f"{kind:<10}{line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("target")
    parser.add_argument("--rank", type=int, default=None,
                        help="the rank to extract at (with --mergekit) and of the optimum")
    parser.add_argument("--mergekit", default=None, help="mergekit-extract-lora's path: run both")
    parser.add_argument("--work", type=Path, default=None, help="where the runs' adapters go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", default=None, help="make-delta's --block-size")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="compare this adapter folder (without --mergekit)")
    args = parser.parse_args()
    if args.mergekit:
        if args.rank is None or args.work is None:
            parser.error("--mergekit needs --rank and --work")
        args.work.mkdir(parents=True, exist_ok=True)
        adapters = run_both(args.base, args.target, args.rank, args.work, args.mergekit,
                            args.repeats, args.block_size)
    else:
        if not args.adapter:
            parser.error("give --mergekit or at least one --adapter")
        adapters = {n: Path(f) for n, _, f in (a.partition("=") for a in args.adapter)}
    compare(args.base, args.target, adapters, args.rank)


if __name__ == "__main__":
    main()
