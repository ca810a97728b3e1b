"""Mixtral: the converter's ``LlamaModel`` (``conversion/llama.py``) with its experts stacked.

Everything but the experts is LLaMA's. Each layer's experts
(``model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight``) become three tensors of
``num_local_experts`` slots, ``blk.N.ffn_{gate,down,up}_exps.weight``, which the converter writes,
in that order, once the layer's last expert has come; expert E's rows are slot E. The router
(``block_sparse_moe.gate``, ``ffn_gate_inp``) stays F32, as every converter class keeps it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...errors import FormatError
from .base import Arch, Stacked
from .llama import Llama

# as the converter names them back from the block and expert numbers (so none with a leading 0)
_NUMBER = r"(0|[1-9]\d*)"
_EXPERT = re.compile(rf"model\.layers\.{_NUMBER}\.block_sparse_moe\.experts\.{_NUMBER}\.(w[123])\.weight")
_KINDS = ("w1", "w2", "w3")  # the converter stacks and writes them in this order


def _experts(h: dict[str, Any], where: Path) -> int:
    n = h.get("num_local_experts")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise FormatError(f"{where}: num_local_experts must be a positive integer, found {n!r}")
    return n


class Mixtral(Llama):
    hf_architectures = ("MixtralForCausalLM",)
    label = "Mixtral"
    refused_keys = tuple(k for k in Llama.refused_keys if k != "num_local_experts")

    def check(self, config: dict[str, Any], h: dict[str, Any], where: Path) -> None:
        super().check(config, h, where)
        _experts(h, where)

    def stacked(self, hf_name: str, h: dict[str, Any], where: Path) -> Stacked | None:
        """``LlamaModel.modify_tensors``' experts: every tensor named ``block_sparse_moe.experts``
        is stacked, so one that is not an expert of the config's count is refused."""
        if "block_sparse_moe.experts" not in hf_name:
            return None
        n = h["num_local_experts"]
        m = _EXPERT.fullmatch(hf_name)
        if m is None or int(m.group(2)) >= n:
            raise FormatError(f"{where}: tensor {hf_name} is not an expert weight of a Mixtral of {n} "
                              "experts (model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight, "
                              "E < num_local_experts)")
        layer = m.group(1)
        names = tuple(f"layers.{layer}.feed_forward.experts.{kind}.weight" for kind in _KINDS)
        return Stacked(names, _KINDS.index(m.group(3)), int(m.group(2)), n)


ARCHS: list[Arch] = [Mixtral()]
