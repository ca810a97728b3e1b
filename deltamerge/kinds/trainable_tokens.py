"""peft trainable tokens (``peft_type`` TRAINABLE_TOKENS): whole rows of an embedding replaced.

peft's ``TrainableTokensLayer.merge`` is ``W.index_copy(0, token_indices, delta.to(W))``: the
rows of the config's ``token_indices`` become the adapter's rows rounded to the weight's dtype,
not a sum. With tied embeddings peft saves the same rows for the output layer too; a base that
stores its output layer apart gets them there as well, one that stores the tied weight once gets
them once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta

OUTPUT_LAYERS = ("lm_head", "embed_out")


class TokenRows(RowDelta):
    """The rows ``indices`` of the weight, replaced by the adapter's rows in order."""

    def __init__(self, source, parts, indices: list[int]):
        super().__init__(source, parts)
        self.indices = torch.tensor(indices)

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        inside = (self.indices >= r0) & (self.indices < r0 + acc.shape[0])
        if inside.any():
            acc[self.indices[inside] - r0] = self.tensors()["trainable_tokens_delta"][inside]


class TrainableTokensKind(AdapterKind):
    name = "trainable-tokens"
    peft_type = "TRAINABLE_TOKENS"
    parts = ("trainable_tokens_delta",)

    def check_config(self, path: Path) -> None:
        indices = self.config.get("token_indices")
        if not isinstance(indices, list) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            raise FormatError(f"{path}: 'token_indices' must be a list of token ids")
        if len(set(indices)) != len(indices):
            raise FormatError(f"{path}: 'token_indices' names a token twice")

    def tied_copy(self, module: str) -> bool:
        return module.rpartition(".")[2] in OUTPUT_LAYERS

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, TokenRows]:
        indices = self.config["token_indices"]
        want = [len(indices), spec.shape[1]]
        if list(self.shape(parts["trainable_tokens_delta"])) != want:
            raise MismatchError(
                f"{self.weights}: tensor {parts['trainable_tokens_delta']!r} is "
                f"{list(self.shape(parts['trainable_tokens_delta']))}, not {want} "
                f"({len(indices)} token_indices of {spec.name!r} {list(spec.shape)})"
            )
        if max(indices) >= spec.shape[0]:
            raise MismatchError(
                f"{self.weights}: token index {max(indices)} is past the {spec.shape[0]} rows "
                f"of {spec.name!r}"
            )
        return {spec.name: TokenRows(self.source, parts, indices)}
