"""What the peft adapter types other than LoRA share: their config, their tensors, their merge.

peft saves an adapter as ``adapter_config.json`` (its ``peft_type`` names the type) and its
parameters under ``base_model.model.<module>.<part>`` (``ia3_l``, ``hada_w1_a``, ``lokr_w1``...).
A type's module (``ia3.py``, ``loha.py``, ``lokr.py``, ``trainable_tokens.py``, ``vera.py``,
``adalora.py``, ``oft.py``, ``boft.py``, ``hra.py``) names its parts and builds, per adapted
module, a :class:`RowDelta` (or, for VeRA and AdaLoRA, a ``lora.Factors``):
what its rows of the merge are. Every adapted module's weight is found in the base as LoRA's are
(``targets.stored_name``), once ``peft_targets`` has kept the modules the config selects (as
for LoRA, with the type's own fields, layers and init: ``peft_targets.PEFT_TYPES``), and
merged by ``lora.LoraStep`` without a replacement: it needs only ``merge`` (a block of rows)
and ``release`` (the tensor is done) of what it is given. The tensors of ``modules_to_save``,
saved under the model's own names, replace the base's in its dtype (what ``load_state_dict``
does to them), through the same step with a replacement.

peft loads an adapter's fp16/bf16 parameters as fp32 (``autocast_adapter_dtype``), computes the
delta in fp32 and merges into the weight in its own dtype; a :class:`RowDelta` does the same
sums a block of rows at a time, through one small fp32 buffer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .. import kind_registry
from ..errors import FormatError, MismatchError, NotFoundError, UnsupportedError
from ..formats.files import read_json_object
from ..sources import open_checkpoint
from ..tensor_spec import TensorSpec
from . import ApplyOptions, Kind, RowInput, Scratch, Step, lora
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, FactorSource, LoraStep
from .patterns import check_patterns, match_patterns
from .peft_targets import base_modules, check_targeting, own_fields, select_targets
from .targets import LayerTypes, stored_name

# peft_type in adapter_config.json -> the kind that merges it (each kind registers its type).
PEFT_KINDS = kind_registry.PEFT_KINDS
# Config fields that would need arithmetic (or tensors) these kinds do not have yet.
_BASE_LAYER = re.compile(r"(?P<module>.+)\.base_layer\.weight")
_UNSUPPORTED = {"trainable_token_indices": "trainable_token_indices (trained token rows)"}


def named_kind(folder: Path) -> str | None:
    """The kind the ``peft_type`` of a folder's ``adapter_config.json`` names, or None when it
    names none merged here or the file cannot be read (both reported when the adapter is opened)."""
    try:
        peft_type = read_json_object(folder / ADAPTER_CONFIG).get("peft_type")
    except FormatError:
        return None
    return PEFT_KINDS.get(peft_type) if isinstance(peft_type, str) else None


def adapter_kind(folder: Path) -> str:
    """The kind of a folder with ``adapter_config.json``: LoRA's unless its peft_type names one
    of the other types merged here (LoRA's opening refuses any other type in one line)."""
    return named_kind(folder) or "lora"


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


class RowDelta(ABC):
    """One adapted weight's merge, computed rows ``[r0, r0 + len(out))`` at a time."""

    row_multiple = 1  # rows per block must be a multiple of this (a rotation's small tensor: all)

    def __init__(self, source: FactorSource, parts: dict[str, str]):
        self.source = source
        self.parts = parts  # part -> key in the adapter's weights
        self._loaded: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's parameters, whole, in fp32, loaded at its tensor's first block."""
        if self._loaded is None:
            self._loaded = {p: self.source.load(k) for p, k in self.parts.items()}
            self.prepare(self._loaded)
        return self._loaded

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Compute, once per tensor, what every block needs (LoKr's small factors' products)."""

    @abstractmethod
    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        """Turn ``acc`` (rows ``[r0, r0 + len(acc))`` of the weight, in fp32) into the merge's."""

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch) -> None:
        self.tensors()
        for a in range(0, out.shape[0], lora.MERGE_ROWS):
            b = min(out.shape[0], a + lora.MERGE_ROWS)
            acc = scratch.get("adapter-acc", torch.float32, (b - a, *out.shape[1:]))
            acc.copy_(cur[a:b])
            self.combine(acc, r0 + a, scratch)
            out[a:b].copy_(acc)

    def release(self) -> None:
        self._loaded = None


class AdapterKind(Kind):
    """A peft adapter of type ``peft_type``: its modules' parts, and a delta for each module."""

    peft_type = "?"
    parts: tuple[str, ...] = ()

    def __init__(self, folder: Path):
        super().__init__(folder)
        path = folder / ADAPTER_CONFIG
        self.config = read_json_object(path)
        peft_type = self.config.get("peft_type")
        if peft_type != self.peft_type:
            raise UnsupportedError(f"{path}: peft_type {peft_type!r} is not {self.peft_type}")
        self.config = own_fields(self.config, self.peft_type)
        check_targeting(path, self.config, self.peft_type)
        for key, what in _UNSUPPORTED.items():
            if self.config.get(key):
                raise UnsupportedError(
                    f"{path}: {what} in a {self.peft_type} adapter: deltamerge does not merge "
                    "it yet (merge with peft instead)"
                )
        self.check_config(path)
        found = [folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()]
        if not found:
            raise NotFoundError(f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")
        self.checkpoint = open_checkpoint(found[0])
        self.weights = found[0]
        self.source = FactorSource(self.weights)
        self._part = re.compile(
            rf"(?P<module>.+)\.(?P<part>{'|'.join(self.parts)})(?:\.[^.]+)?"
        )


    def refuse_bias(self, path: Path, label: str) -> None:
        """peft's ``bias`` other than ``"none"`` trains the layers' biases too, which the merge
        would need as a delta of its own: refused, as for LoRA."""
        if self.config.get("bias", "none") != "none":
            raise UnsupportedError(f"{path}: bias={self.config['bias']!r} trains the biases too: "
                                   f"deltamerge merges {label} adapters with bias='none' only")

    def refuse_conv1d(self, module: str, name: str, reason: str) -> None:
        """A GPT-2 Conv1D layer (its weight stored transposed) where the type has no arithmetic
        for one: refused in one line naming the module and tensor, ``reason`` saying why."""
        if self.transposed(name):
            raise UnsupportedError(f"{self.weights}: module {module!r}: {name!r} is a Conv1D layer: "
                                   f"{reason}")

    def integer_field(self, path: Path, key: str, default: int) -> int:
        """A config field peft uses as an integer (a seed, a PRNG key), refused as anything else."""
        value = self.config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FormatError(f"{path}: {key!r} must be an integer, not {value!r}")
        return value
    def check_config(self, path: Path) -> None:  # noqa: B027 - optional hook
        """Refuse what the type's config asks for that is not merged here."""

    def check_patterns(self, path: Path, fields: tuple[str, ...]) -> None:
        """The numbers in ``fields`` and the patterns of ``rank_pattern``/``alpha_pattern``."""
        for key in fields:
            if not is_number(self.config.get(key)):
                raise FormatError(f"{path}: {key!r} must be a number, not {self.config.get(key)!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = self.config.get(key) or {}
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and is_number(v) for k, v in pattern.items()
            ):
                raise FormatError(f"{path}: {key!r} must map module patterns to numbers")
            check_patterns(path, key, pattern)

    def rank_alpha(self, modules: list[str]) -> dict[str, tuple[float, float]]:
        """Each module's ``(r, alpha)`` as peft picks them (``get_pattern_key``)."""
        found = match_patterns(self.folder / ADAPTER_CONFIG, {
            key: self.config.get(key) or {} for key in ("rank_pattern", "alpha_pattern")
        }, modules)
        return {m: (found["rank_pattern"].get(m, self.config["r"]),
                    found["alpha_pattern"].get(m, self.config["alpha"])) for m in modules}

    def modules(self) -> dict[str, dict[str, str]]:
        """The adapter's keys by module (the model's name for it) and part; the tensors of its
        ``modules_to_save`` go to ``self.whole`` (the model's name to the key), the weights of
        adapted embeddings peft saves as they were loaded (``<module>.base_layer.weight``, its
        ``save_embedding_layers``) to ``self.base_layers`` (the module to the key)."""
        modules: dict[str, dict[str, str]] = {}
        self.whole: dict[str, str] = {}
        self.base_layers: dict[str, str] = {}
        for key in self.checkpoint.specs:
            short = key.removeprefix(PREFIX)
            m = self._part.fullmatch(short)
            if m is not None:
                modules.setdefault(m["module"], {})[m["part"]] = key
            elif (b := _BASE_LAYER.fullmatch(short)) is not None:
                self.base_layers[b["module"]] = key
            elif self.config.get("modules_to_save") and key.startswith(PREFIX) and not re.search(
                r"\.(modules_to_save|original_module)\.", short
            ):
                self.whole[short] = key
            else:
                raise UnsupportedError(
                    f"{self.weights}: tensor {key!r} is not a {self.peft_type} parameter nor a "
                    f"saved module: deltamerge merges the {self.peft_type} parameters and the "
                    "modules_to_save peft saves under their own names only"
                )
        return modules

    def _replacements(self, specs: dict[str, TensorSpec]) -> dict[str, Step]:
        """A step per saved module tensor: the base's tensor replaced, in the base's dtype, as
        peft's ``load_state_dict`` copies it into the module before ``merge_and_unload``."""
        steps: dict[str, Step] = {}
        for short, key in self.whole.items():
            name = stored_name(short, specs)
            new = self.checkpoint.specs[key]
            if name is None or specs[name].shape != new.shape:
                where = "which the base lacks" if name is None else f"of shape {list(specs[name].shape)}"
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} {list(new.shape)} replaces {short!r}, {where}"
                )
            steps[name] = LoraStep(specs[name], specs[name], RowInput(self.checkpoint, key), None)
        return steps

    def transposed(self, name: str) -> bool:
        """peft's ``fan_in_fan_out`` for the weight ``name``: read off the layer, not the config
        (peft resets it to false on ``nn.Linear``, to true on ``Conv1D``, with a warning)."""
        return self.layer_types.conv1d(name)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.specs[key].shape)

    @abstractmethod
    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, RowDelta]:
        """The merge of each stored tensor ``module`` changes (its weight, IA3's bias too)."""

    def select(
        self, modules: dict[str, dict[str, str]], specs: dict[str, TensorSpec]
    ) -> dict[str, dict[str, str]]:
        """The modules peft adapts (``peft_targets``, as for LoRA): the parameters of any other
        are unexpected keys to peft, dropped; a tied output layer's copy is kept for
        ``tied_copy``. ``check_selection`` sees every selected module, with parameters or not."""
        factored = {m: self.peft_type != "TRAINABLE_TOKENS" for m in modules
                    if not self.tied_copy(m)}
        base = base_modules((n, len(s.shape)) for n, s in specs.items())
        targeted = select_targets(self.folder / ADAPTER_CONFIG, self.config, factored, base,
                                  False, self.peft_type)
        self.check_selection(targeted, specs)
        return {m: p for m, p in modules.items() if m in targeted or m not in factored}

    def check_selection(self, targeted: set[str], specs: dict[str, TensorSpec]) -> None:  # noqa: B027
        """Refuse a selection that peft would size its shared tensors by differently (VeRA)."""

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        self.source.pool = options.pool
        self.layer_types = LayerTypes(self.weights, specs)
        modules = self.select(self.modules(), specs)
        self.prepare_plan(list(modules))
        steps = self._replacements(specs)
        for module, parts in modules.items():
            name = stored_name(f"{module}.weight", specs)
            if name is None and self.tied_copy(module):
                continue
            if name is None:
                raise MismatchError(
                    f"{self.weights}: {self.peft_type} module {module!r} has no tensor "
                    f"{module + '.weight'!r} in the base"
                )
            if len(specs[name].shape) != 2:
                raise UnsupportedError(
                    f"{self.weights}: module {module!r}: tensor {name!r} is "
                    f"{list(specs[name].shape)}: deltamerge merges {self.peft_type} into Linear "
                    "layers only"
                )
            for target, delta in self.deltas(module, parts, specs[name], specs).items():
                if target in steps:
                    raise UnsupportedError(f"{self.weights}: tensor {target!r} is saved whole and "
                                           f"adapted by {self.peft_type} too")
                loaded = self._base_layer(module, name, specs) if target == name else None
                steps[target] = LoraStep(specs[target], specs[target], loaded, delta)
                steps[target].row_multiple = getattr(delta, "row_multiple", 1)
        return dict(specs), steps

    def _base_layer(self, module: str, name: str, specs: dict[str, TensorSpec]) -> RowInput | None:
        """The module's weight as the adapter saved it, which peft loads over the base's (in its
        dtype) before merging: the same tensor, unless the adapter's base differs."""
        key = self.base_layers.get(module)
        if key is None:
            return None
        if self.checkpoint.specs[key].shape != specs[name].shape:
            raise MismatchError(f"{self.weights}: tensor {key!r} {list(self.shape(key))} replaces "
                                f"{name!r}, of shape {list(specs[name].shape)}")
        return RowInput(self.checkpoint, key)

    def tied_copy(self, module: str) -> bool:
        """Whether ``module``'s parameters are a copy peft saves for a weight tied to another
        (the output layer of tied embeddings), left out when the base does not store it."""
        return False

    def prepare_plan(self, modules: list[str]) -> None:  # noqa: B027 - optional hook
        """What the type reads from its config for all modules at once (rank/alpha patterns)."""

    def close(self) -> None:
        self.checkpoint.close()
        self.source.close()

