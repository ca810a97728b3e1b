"""Where a tensor of the model in memory is stored in its checkpoint.

peft names what it adapts after the model as transformers builds it in memory; a checkpoint
stores tensors under the names (and in the pieces) of the files it came from. transformers 5
converts some architectures while loading, and reverts the conversion when saving: Mixtral's
``block_sparse_moe.`` is ``mlp.`` in memory, and the per-expert weights ``experts.{e}.w1``
(gate), ``w3`` (up) and ``w2`` (down) become the 3-D parameters ``mlp.experts.gate_up_proj``
(experts, gate rows then up rows, hidden) and ``mlp.experts.down_proj`` (experts, hidden,
ffn); Qwen2-MoE-style models fuse ``experts.{e}.gate_proj/up_proj/down_proj`` the same way;
GPT-NeoX's ``embed_out`` is ``lm_head``. This module maps those names back, so a merge lands on
the tensors the base stores, in its own layout. A name the base stores as it is always wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsupportedError
from ..tensor_spec import TensorSpec

# (in memory, stored): transformers 5's renames for the architectures deltamerge knows.
RENAMES = ((re.compile(r"\.mlp\."), ".block_sparse_moe."), (re.compile(r"^lm_head\."), "embed_out."))
RENAMED_BACK = ((re.compile(r"\.block_sparse_moe\."), ".mlp."), (re.compile(r"^embed_out\."), "lm_head."))
# A fused expert parameter and, per spelling, the per-expert tensors stacked into it, in order.
FUSED_EXPERTS = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}


def stored_name(name: str, specs: dict[str, TensorSpec]) -> str | None:
    """The base's name for the in-memory tensor ``name``, or None when the base lacks it."""
    if name in specs:
        return name
    for pattern, repl in RENAMES:
        alt = pattern.sub(repl, name)
        if alt != name and alt in specs:
            return alt
    return None


def memory_names(name: str) -> list[str]:
    """The names the base's tensor ``name`` may have in memory: its own, and the renamed one."""
    names = [name]
    for pattern, repl in RENAMED_BACK:
        alt = pattern.sub(repl, name, count=1)
        if alt != name:
            names.append(alt)
    return names


class LayerTypes:
    """Whether a weight of the base is transformers' ``Conv1D`` ([in, out], GPT-2) rather than an
    ``nn.Linear`` ([out, in]): peft transposes the product for the one, not the other.

    Only biases tell: a Linear's has its weight's rows, a Conv1D's its columns. A weight that
    cannot tell (square, or without a bias) is the type of the base's weights that can, when
    they agree; a base where none can (LLaMA has no biases) has Linear layers, the only kind of
    the architectures without biases.
    """

    def __init__(self, where: Path, specs: dict[str, TensorSpec]):
        self.where = where
        self.specs = specs
        self.seen = {found for n in specs if (found := _bias_says(n, specs)) is not None}

    def conv1d(self, name: str) -> bool:
        own = _bias_says(name, self.specs)
        if own is not None:
            return own
        if len(self.seen) > 1:
            raise UnsupportedError(
                f"{self.where}: the base has both Linear and Conv1D layers, and {name!r} (square "
                "or without a bias) could be either: deltamerge cannot tell whether peft "
                "transposes its product"
            )
        return next(iter(self.seen), False)


def _bias_says(name: str, specs: dict[str, TensorSpec]) -> bool | None:
    """Conv1D (True) or Linear (False), by the bias beside a non-square weight; None: no answer."""
    spec, bias = specs.get(name), specs.get(name.removesuffix("weight") + "bias")
    if not name.endswith(".weight") or spec is None or bias is None or len(spec.shape) != 2:
        return None
    rows, cols = spec.shape
    if rows == cols or len(bias.shape) != 1:
        return None
    return {rows: False, cols: True}.get(bias.shape[0])


# Modules whose 2-D weight is an embedding's, not a Linear layer's: every name with "embed" in
# it (embed_tokens, embed_in, word_embeddings, embed_positions, ...), and GPT-2's and T5's.
_EMBEDDINGS = re.compile(r"(?:.*embed.*|wte|wpe|shared)")
_EXPERT = re.compile(r"(?:^|\.)experts\.")


def linear_weights(specs: dict[str, TensorSpec]) -> tuple[list[str], str | None]:
    """The weights transformers' bitsandbytes loading replaces by 4-bit layers, and the first
    tensor of a mixture of experts, if the base has one.

    ``replace_with_bnb_linear`` converts every ``nn.Linear`` (and ``Conv1D``) but the modules
    ``get_keys_to_not_convert`` names: the output layer, tied weights and the model's last
    parameter (in causal LMs the output layer or a norm). Seen from a checkpoint, that is every
    2-D ``.weight`` whose module is not an embedding and not ``lm_head`` (GPT-NeoX's
    ``embed_out``). Experts are not decided here: transformers 4 quantized each expert's and
    the router's Linear layers, transformers 5 fuses the experts into parameters and quantizes
    neither, so the caller is told that the base has them.
    """
    found: list[str] = []
    experts = None
    for name, spec in specs.items():
        if _EXPERT.search(name):
            experts = experts or name
            continue
        if not name.endswith(".weight") or len(spec.shape) != 2:
            continue
        module = memory_names(name)[-1].removesuffix(".weight")
        last = module.rsplit(".", 1)[-1]
        if last != "lm_head" and not _EMBEDDINGS.fullmatch(last):
            found.append(name)
    return found, experts


@dataclass(frozen=True)
class Piece:
    """A stored tensor holding rows ``[r0, r1)`` of one expert of a fused parameter."""

    name: str
    expert: int
    r0: int
    r1: int


@dataclass(frozen=True)
class Stored:
    """How the base stores an in-memory parameter of shape ``shape``.

    Either whole under ``name`` (a 2-D weight, or a fused 3-D expert tensor), or as ``pieces``:
    one 2-D tensor per expert and part, the parameter being their per-expert concatenation.
    """

    shape: tuple[int, ...]
    name: str | None = None
    pieces: tuple[Piece, ...] = ()


def stored_parameter(module: str, param: str, specs: dict[str, TensorSpec]) -> Stored | None:
    """Where the base keeps parameter ``param`` of in-memory ``module``, or None."""
    whole = stored_name(f"{module}.{param}", specs)
    if whole is not None:
        return Stored(specs[whole].shape, name=whole)
    for spelling in FUSED_EXPERTS.get(param, ()):
        for folder in dict.fromkeys([module, *(p.sub(r, module) for p, r in RENAMES)]):
            found = _per_expert(folder, spelling, specs)
            if found is not None:
                return found
    return None


def _per_expert(folder: str, parts: tuple[str, ...], specs: dict[str, TensorSpec]) -> Stored | None:
    """Experts ``0..E-1`` stored as ``{folder}.{e}.{part}.weight``, all of one shape."""
    pieces: list[Piece] = []
    shapes = set()
    e = 0
    while all(f"{folder}.{e}.{p}.weight" in specs for p in parts):
        row = 0
        for p in parts:
            spec = specs[f"{folder}.{e}.{p}.weight"]
            if len(spec.shape) != 2:
                return None
            pieces.append(Piece(spec.name, e, row, row + spec.shape[0]))
            row += spec.shape[0]
            shapes.add((p, spec.shape))
        e += 1
    if not pieces or len(shapes) != len(parts):
        return None
    widths = {shape[1] for _, shape in shapes}
    if len(widths) != 1:
        return None
    return Stored((e, pieces[-1].r1, widths.pop()), pieces=tuple(pieces))
