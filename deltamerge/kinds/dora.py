"""DoRA (peft's ``use_dora``): a LoRA whose merged rows are rescaled to a learned magnitude.

peft 0.21's ``DoraLinearVariant.merge_unsafe`` computes, for a Linear layer,
``S = fp32(W) + dW`` (``dW`` the LoRA product with its scale, fp32 as peft's autocast makes the
factors), the norm of each OUTPUT row of ``S``, then ``W' = cast_W((m / ||S||) * S)`` with ``m``
the saved ``lora_magnitude_vector`` (fp32). Each row's factor needs only that row, so a block of
rows streams like a plain LoRA: the product's windows (``lora.Factors``) give ``dW``, and the
sum each window adds is rescaled before it is rounded. Embeddings and GPT-2's Conv1D layers are
rescaled per column instead (a norm over every row): ``kinds/lora.py`` refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from . import Scratch


class Factors(Protocol):
    """What DoRA needs of ``lora.Factors`` (which imports this module, so not imported here)."""

    source: Any

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch,
              rescale: Callable[[torch.Tensor, int], None] | None = None) -> None: ...

    def release(self) -> None: ...


class DoraFactors:
    """One Linear module's LoRA factors and its magnitude vector, merged as peft's DoRA."""

    def __init__(self, factors: Factors, magnitude: str):
        self.factors = factors
        self.magnitude_name = magnitude
        self._magnitude: torch.Tensor | None = None

    def _rescale(self, acc: torch.Tensor, row: int) -> None:
        """``acc`` holds rows ``row..`` of ``fp32(W) + dW``: scale each to ``m / ||row||``, the
        quotient and product in fp32 as peft's (the norm per row, as ``linalg.norm(dim=1)``)."""
        assert self._magnitude is not None
        norm = torch.linalg.norm(acc, dim=1)
        acc.mul_((self._magnitude[row : row + acc.shape[0]] / norm).view(-1, 1))

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch) -> None:
        if self._magnitude is None:  # loaded here: the windows rescale on the pool's threads
            self._magnitude = self.factors.source.load(self.magnitude_name)
        self.factors.merge(cur, out, r0, scratch, self._rescale)

    def release(self) -> None:
        self.factors.release()
        self._magnitude = None
