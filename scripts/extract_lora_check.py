#!/usr/bin/env python3
"""How good and how fast ``make-delta --kind lora`` is, against a full SVD (what mergekit does).

    python scripts/extract_lora_check.py BASE TARGET --rank 16 [--block-size 24MB] [--layers N]

First runs ``deltamerge make-delta BASE TARGET TMP --kind lora --rank R`` in a child process
and prints its summary (its time and peak RSS, as deltamerge reports them). Then, per 2-D layer
matrix (q, k, v, o, gate, up, down): the streamed randomized SVD (``kinds/lora_extract.py``,
one torch thread, as make-delta runs it), and the optimum mergekit-extract-lora computes, a
full fp32 SVD of the whole difference truncated at the same rank (torch's default threads). By
default only its singular values are computed (as the eigenvalues of the fp64 Gram matrix of the
shorter side), which give the same optimal error, ``sqrt(sum of s[R:]^2) / ||D||``, several
times sooner; ``--full-svd`` runs mergekit's ``torch.linalg.svd`` itself, for its time.
Our error is ``||D - B @ A|| / ||D||`` of the fp32 factors, on the whole matrix (the check
holds matrices whole; make-delta never does). Prints a line per matrix, then per kind of
matrix: both errors, their ratio, both times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from deltamerge.kinds.lora_extract import factorize
from deltamerge.sizes import DEFAULT_BLOCK_BYTES, parse_size
from deltamerge.sources import Checkpoint, open_checkpoint

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def whole(ckpt: Checkpoint, name: str) -> torch.Tensor:
    spec = ckpt.specs[name]
    buf = torch.empty(spec.nbytes, dtype=torch.uint8)
    return ckpt.read_rows(name, 0, spec.rows, buf).to(torch.float32)


def error(diff: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(diff - b @ a) / torch.linalg.matrix_norm(diff))


def optimum(diff: torch.Tensor, rank: int) -> float:
    """The least relative error at ``rank`` (Eckart-Young) from the singular values alone: the
    eigenvalues of the fp64 Gram matrix of the shorter side are their squares."""
    wide = diff.to(torch.float64)
    gram = wide @ wide.T if wide.shape[0] <= wide.shape[1] else wide.T @ wide
    s = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)  # sigma^2, descending
    return float((s[rank:].sum() / s.sum()).sqrt())


def run_make_delta(base: str, target: str, rank: int, block: str, scratch: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        command = [sys.executable, "-m", "deltamerge", "make-delta", base, target,
                   str(Path(tmp) / "lora"), "--kind", "lora", "--rank", str(rank),
                   "--block-size", block]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("target")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--block-size", default="24MB")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers")
    parser.add_argument("--no-make-delta", action="store_true", help="skip the CLI run")
    parser.add_argument("--full-svd", action="store_true",
                        help="time mergekit's full SVD (vectors too; slow) rather than the "
                             "singular values alone, which give the same optimum error")
    parser.add_argument("--scratch", default=None, help="where the CLI run's adapter goes "
                        "(a temporary folder, removed after; default: the system's)")
    args = parser.parse_args()
    if not args.no_make_delta:
        run_make_delta(args.base, args.target, args.rank, args.block_size, args.scratch)
    block = parse_size(args.block_size) or DEFAULT_BLOCK_BYTES
    threads = torch.get_num_threads()
    how = "full SVD" if args.full_svd else "optimum"  # what the second time is of
    rows: dict[str, list[list[float]]] = defaultdict(list)
    with open_checkpoint(args.base) as base, open_checkpoint(args.target) as target:
        names = [n for n in base.specs if n.endswith(tuple(f"{k}.weight" for k in KINDS))]
        if args.layers is not None:
            names = [n for n in names if int(n.split(".layers.")[1].split(".")[0]) < args.layers]
        for name in names:
            torch.set_num_threads(1)
            start = time.perf_counter()
            found = factorize(base, target, name, args.rank, block)
            ours_s = time.perf_counter() - start
            torch.set_num_threads(threads)
            if found is None:
                print(f"{name}: unchanged")
                continue
            start = time.perf_counter()
            diff = whole(target, name) - whole(base, name)
            if args.full_svd:  # mergekit's own computation: the vectors too, then the factors
                u, s, vh = torch.linalg.svd(diff, full_matrices=False)
                root = s[: args.rank].sqrt()
                best = error(diff, u[:, : args.rank] * root, root[:, None] * vh[: args.rank])
                del u, vh
            else:
                best = optimum(diff, args.rank)
            svd_s = time.perf_counter() - start
            ours = error(diff, found.lora_b, found.lora_a)
            kind = next(k for k in KINDS if name.endswith(f"{k}.weight"))
            rows[kind].append([ours, best, ours_s, svd_s])
            print(f"{name} {tuple(found.lora_b.shape[:1] + found.lora_a.shape[1:])}: error "
                  f"{ours:.6f} (full SVD {best:.6f}, "
                  f"ratio {ours / best:.5f}); {ours_s:.2f} s ({how} {svd_s:.2f} s)", flush=True)
            del diff
    print(f"\nrank {args.rank}, block {args.block_size}: per kind of matrix (mean over layers)")
    print(f"{'kind':<10} {'error':>10} {'full SVD':>10} {'ratio':>8} {'time s':>8} {how + ' s':>12}")
    for kind in KINDS:
        if rows[kind]:
            ours, best, ours_s, svd_s = (sum(col) / len(col) for col in zip(*rows[kind]))
            print(f"{kind:<10} {ours:>10.6f} {best:>10.6f} {ours / best:>8.5f} {ours_s:>8.2f} "
                  f"{svd_s:>12.2f}")


if __name__ == "__main__":
    main()
