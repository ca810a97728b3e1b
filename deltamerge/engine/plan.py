"""The plan: which tensors are written, from what, into which shard, in which order.

Everything about the output is decided here, before any tensor data is read: names, dtypes and
shapes (so the streaming writer can emit each shard's header first), shard boundaries, and the
row blocks each tensor is cut into.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..dtypes import itemsize
from ..formats.safetensors import aligned_order
from ..kinds import Step
from ..tensor_spec import TensorSpec


@dataclass
class TensorJob:
    """One output tensor: the base rows it starts from and the steps that change them."""

    out: TensorSpec
    base: TensorSpec | None
    steps: list[Step] = field(default_factory=list)
    fill: str = "zero"  # how rows beyond the base's start: "zero" or "mean"
    mean: torch.Tensor | None = None  # fp32 mean of the base's rows, for fill == "mean"
    rows_per_block: int = 1

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def base_rows(self) -> int:
        return self.base.rows if self.base is not None else 0

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges, at least one even for an empty tensor (so shards open and close)."""
        rows = self.out.rows
        if rows == 0:
            yield 0, 0
            return
        for r0 in range(0, rows, self.rows_per_block):
            yield r0, min(rows, r0 + self.rows_per_block)


def rows_per_block(job: TensorJob, block_bytes: int, multiple: int = 1) -> int:
    """As many rows as keep the widest buffer (fp32 work, or any wider input) within the limit,
    rounded down to a multiple every step (and ``multiple``: the sink's, whole heads) accepts.

    A tensor of no elements is one block of all its rows, whatever its dimensions: its buffers
    are empty, and cutting a zero-width tensor of 2**31 rows into blocks would only loop.
    """
    multiple = math.lcm(multiple, *(s.row_multiple for s in job.steps))
    if job.out.numel == 0:
        return -(-max(job.out.rows, 1) // multiple) * multiple
    widest = max(
        [4, itemsize(job.out.dtype)]
        + ([itemsize(job.base.dtype)] if job.base is not None else [])
        + [itemsize(i.spec.dtype) for s in job.steps for i in s.inputs]
    )
    per_row = max(1, job.out.row_numel * widest)
    rows = max(1, block_bytes // per_row)
    return max(multiple, rows // multiple * multiple)


@dataclass
class Shard:
    filename: str
    jobs: list[TensorJob]

    @property
    def specs(self) -> list[TensorSpec]:
        return [j.out for j in self.jobs]


def layout_shards(
    jobs: list[TensorJob], max_shard_size: int, prefix: str = "model"
) -> list[Shard]:
    """Greedy in job order, as transformers does; a tensor larger than the limit gets its own shard.

    Within a shard, tensors are ordered by item size, largest first, so each starts aligned.
    """
    groups: list[list[TensorJob]] = []
    size = 0
    for job in jobs:
        nbytes = job.out.nbytes
        if not groups or (size + nbytes > max_shard_size and size > 0):
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += nbytes
    if not groups:
        groups = [[]]
    shards = []
    for i, group in enumerate(groups):
        order = {id(s): j for s, j in zip((j.out for j in group), group)}
        ordered = [order[id(s)] for s in aligned_order(j.out for j in group)]
        name = (
            f"{prefix}.safetensors"
            if len(groups) == 1
            else f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        shards.append(Shard(name, ordered))
    return shards
