"""Which modules peft adapts, from ``adapter_config.json``, decided as peft decides it.

peft does not merge every factor an adapter file holds: it wraps the modules its config selects
(``check_target_module_exists`` in ``peft/tuners/tuners_utils.py``) and loads the file's factors
into those; factors of any other module are unexpected keys that it drops with a warning. A
module is excluded when ``exclude_modules`` names it (a string is a full-match regex, a list
entry the name or a ``.``-suffix of it) or when a ``modules_to_save`` entry ``m`` matches
``(^|.*\\.)m($|\\..*)``; otherwise it is a target when ``target_modules`` full-matches it (a
string), lists it exactly, or lists a ``.``-suffix of it, then only in the layers
``layers_to_transform`` lists (the layer index is the first number after ``layers_pattern``, or
the first ``.<name>.<number>.`` when there is no pattern). ``"all-linear"`` targets every Linear
or Conv1D layer but the output layer (``lm_head``): here every module with ``lora_A``/``lora_B``
factors, which only such layers have. peft refuses a config that selects nothing, and a target
that is not a layer it can adapt (a block of layers, a norm); so does this module, as far as the
base's tensor names show them (modules without parameters, an activation, are not in them).
The other adapter types select as LoRA does, with the fields their config class has (an IA3
config's ``layers_to_transform`` is dropped, as peft drops it), their own layer types and their
own init field (``PEFT_TYPES``).

The module names are the model's in memory (``targets.memory_names`` maps the base's back).
Every regex goes through ``patterns.run_rules``, under its deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, MismatchError, UnsupportedError
from .patterns import Rule, run_rules
from .targets import memory_names

ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
DUMMY = "dummy-target-modules"  # peft's DUMMY_TARGET_MODULES: an adapter of modules_to_save only
OUTPUT_LAYER = "lm_head"  # what get_output_embeddings() is named in the causal LMs peft adapts
# Inits that change the base's weights when peft loads the adapter (PiSSA, OLoRA and CorDA
# subtract the initial product from W, LoftQ quantizes W): the merge depends on the init run.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# Inits that leave a targeted module's B non-zero and random: peft would add noise where the
# adapter file has no factors for a module its config targets.
RANDOM_INITS = (False, "orthogonal")


@dataclass(frozen=True)
class PeftTypeInfo:
    """What selecting modules differs in between peft's adapter types."""

    fields: tuple[str, ...]  # the selecting fields its config class has (peft drops the others)
    dims: tuple[int, ...]  # the numbers of dimensions of the weights of the layers it adapts
    layers: str  # those layers, for messages
    init: str  # the config field that initialises a module the file has no factors for
    random: tuple[object, ...]  # the values of ``init`` that make those factors random


_SELECTING = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
_LYCORIS = PeftTypeInfo(_SELECTING, (2, 3, 4), "a Linear, Conv1d or Conv2d layer",
                        "init_weights", (False,))
PEFT_TYPES = {
    "LORA": PeftTypeInfo(_SELECTING, (2,), "a Linear or Embedding layer", "init_lora_weights",
                         RANDOM_INITS),
    # init_ia3_weights=False leaves the vector torch.randn
    "IA3": PeftTypeInfo(("exclude_modules", "modules_to_save"), (2, 4, 5),
                        "a Linear, Conv1D, Conv2d or Conv3d layer", "init_ia3_weights", (False,)),
    "LOHA": _LYCORIS,
    # "lycoris" zeroes w2 instead of w1: no effect either
    "LOKR": _LYCORIS,
    # VeraConfig has no exclude_modules; init_weights=False leaves lambda_b at ones
    "VERA": PeftTypeInfo(("layers_to_transform", "layers_pattern", "modules_to_save"), (2,),
                         "a Linear or Conv1D layer", "init_weights", (False,)),
    # init_weights=True copies the base's rows: no effect; False makes them random
    "TRAINABLE_TOKENS": PeftTypeInfo((), (2,), "an Embedding layer", "init_weights", (False,)),
    "FOURIERFT": PeftTypeInfo(_SELECTING, (2,), "a Linear or Conv1D layer", "init_weights", (False,)),
    "RANDLORA": PeftTypeInfo(("layers_to_transform", "layers_pattern", "modules_to_save"), (2,),
                             "a Linear or Conv1D layer", "init_weights", (False,)),
    "MISS": PeftTypeInfo(_SELECTING, (2,), "a Linear layer", "init_weights", (False,)),
    "SHIRA": PeftTypeInfo(("modules_to_save",), (2,), "a Linear layer", "init_weights", (False,)),
    "C3A": PeftTypeInfo(("layers_to_transform", "layers_pattern", "modules_to_save"), (2,), "a Linear layer",
                        "init_weights", (False, "gaussian", "kaiming_uniform", "xavier_uniform")),
    "ADALORA": PeftTypeInfo(_SELECTING, (2, 4), "a Linear, Conv1D or Conv2d layer", "init_lora_weights",
                            (False,)),
    "BOFT": PeftTypeInfo(_SELECTING, (2, 4), "a Linear or Conv2d layer", "init_weights", (False,)),
    # init_weights=True pairs equal reflections: I only up to rounding, which the random u decide
    "HRA": PeftTypeInfo(_SELECTING, (2, 4), "a Linear or Conv2d layer", "init_weights", (True, False)),
    "OFT": PeftTypeInfo(_SELECTING, (2, 4), "a Linear, Embedding or Conv2d layer", "init_weights", (False,)),
}


def own_fields(config: dict, peft_type: str) -> dict:
    """The config as peft reads it for ``peft_type``: a selecting field its config class lacks is
    an unexpected key, which peft drops with a warning."""
    own = PEFT_TYPES[peft_type].fields
    return {k: v for k, v in config.items() if k not in _SELECTING or k in own}


# The config classes whose __post_init__ refuses layers with a regex target_modules.
_LAYERS_NEED_LIST = ("LORA", "FOURIERFT", "MISS", "C3A")
_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # peft's layer index without layers_pattern


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_targeting(path: Path, config: dict, peft_type: str = "LORA") -> None:
    """The fields that select modules, with the types peft accepts and the combinations
    the type's config ``__post_init__`` allows; ``init_lora_weights`` that would change the base."""
    targets, params = config.get("target_modules"), config.get("target_parameters")
    if targets is None and not params:
        raise UnsupportedError(
            f"{path}: target_modules is null: peft then picks its default modules for the base's "
            "model type, which deltamerge does not guess; write them into target_modules"
        )
    for field, allowed in (("target_modules", "a string or a list of strings"),
                           ("exclude_modules", "a string or a list of strings"),
                           ("layers_pattern", "a string or a list of strings"),
                           ("modules_to_save", "a list of strings")):
        value = config.get(field)
        if value is not None and not (_strings(value) or (isinstance(value, str)
                                                           and field != "modules_to_save")):
            raise FormatError(f"{path}: {field} must be {allowed}, not {value!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (_int(layers) or (isinstance(layers, list)
                                                    and all(_int(v) for v in layers))):
        raise FormatError(f"{path}: layers_to_transform must be an integer or a list of them")
    if peft_type in _LAYERS_NEED_LIST and isinstance(targets, str) and (
            layers is not None or config.get("layers_pattern") is not None):
        field = "layers_to_transform" if layers is not None else "layers_pattern"
        raise FormatError(f"{path}: {field} cannot be used when target_modules is a string "
                          "(peft refuses this config)")
    if config.get("layers_pattern") and layers is None:
        raise FormatError(f"{path}: layers_pattern is set without layers_to_transform "
                          "(peft refuses this config)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UnsupportedError(
            f"{path}: init_lora_weights={init!r} changes the base's weights when peft loads the "
            "adapter; convert it to a plain LoRA first (peft's save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    if config.get("ensure_weight_tying"):
        raise UnsupportedError(
            f"{path}: ensure_weight_tying gives tied layers one shared adapter, which deltamerge "
            "does not merge"
        )
    if config.get("megatron_config"):
        raise UnsupportedError(f"{path}: megatron_config: Megatron's parallel layers are not "
                               "merged by deltamerge")


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def base_modules(names: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Every module the base's tensor names (with their numbers of dimensions) show, in memory,
    with the number of dimensions of its ``weight`` (0: a block of other modules, or a module
    without a weight)."""
    modules: dict[str, int] = {}
    for name, dims in names:
        for memory in memory_names(name):
            parts = memory.split(".")
            for i in range(1, len(parts) - 1):
                modules.setdefault(".".join(parts[:i]), 0)
            module = ".".join(parts[:-1])
            if parts[-1] == "weight":
                modules[module] = dims
            else:
                modules.setdefault(module, 0)
    return modules


def select_targets(
    path: Path, config: dict, factored: dict[str, bool], base: dict[str, int],
    params_targeted: bool, peft_type: str = "LORA",
) -> set[str]:
    """The modules peft adapts, given ``factored`` (module -> has Linear factors): those of
    ``factored`` and those without factors, which peft initialises as ``init`` says. Refused
    where peft refuses, or where a target without factors would get random values."""
    kind = PEFT_TYPES[peft_type]
    names = list(dict.fromkeys([*factored, *base]))
    decision = _decide(path, config, names, factored)
    targeted = {n for n, d in decision.items() if d is True}
    if not targeted and not params_targeted and config.get("target_modules") != DUMMY:
        fields = [f for f in ("exclude_modules", "modules_to_save", "layers_to_transform",
                              "layers_pattern") if config.get(f) is not None]
        raise MismatchError(
            f"{path}: target_modules {config.get('target_modules')!r}"
            + (f" (with {', '.join(fields)})" if fields else "")
            + " selects no module of the base: peft refuses to load this adapter"
        )
    for name in sorted(targeted - set(factored)):
        if base.get(name) not in kind.dims:
            raise UnsupportedError(
                f"{path}: target_modules selects {name!r}, "
                + ("a block of layers" if base.get(name) == 0 else f"not {kind.layers}")
                + ": peft cannot adapt it and refuses to load this adapter"
            )
        init = config.get(kind.init, True)
        if init in kind.random:
            raise MismatchError(
                f"{path}: target_modules selects {name!r} but the adapter has no factors for it: "
                f"with {kind.init}={init!r} peft would initialise them at random"
            )
    return targeted


def check_saved_modules(
    path: Path, weights: Path, config: dict, base: Iterable[str], saved: set[str]
) -> None:
    """Every tensor of a module ``modules_to_save`` wraps must be in the adapter's file.

    peft wraps each module whose name ends with an entry (a plain suffix, not a regex) and loads
    its whole state from the file; one it lacks is a KeyError in peft.
    """
    entries = config.get("modules_to_save") or []
    for name in base:
        if name in saved:
            continue
        for memory in memory_names(name):
            parts = memory.split(".")
            owners = [".".join(parts[:i]) for i in range(1, len(parts))]
            entry = next((e for e in entries for o in owners if o.endswith(e)), None)
            if entry is not None:
                raise MismatchError(
                    f"{weights}: {path.name} lists {entry!r} in modules_to_save but the adapter "
                    f"stores no {name!r}: peft fails to load it"
                )


def _decide(
    path: Path, config: dict, names: list[str], factored: dict[str, bool]
) -> dict[str, bool | str]:
    """peft's check_target_module_exists for every name: True, False or "excluded"."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) and patterns else list(patterns or [])
    rules = [Rule("modules_to_save entry", m, rf"(^|.*\.){m}($|\..*)") for m in saved]
    if isinstance(exclude, str):
        rules.append(Rule("exclude_modules", exclude, exclude, "fullmatch"))
    regex_target = isinstance(targets, str) and targets.lower() != ALL_LINEAR and targets != DUMMY
    if regex_target:
        rules.append(Rule("target_modules", targets, targets, "fullmatch"))
    rules += [Rule("layers_pattern entry", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns]
    found = run_rules(path, rules, names)
    saved_hits = found[: len(saved)]
    rest = found[len(saved):]
    exclude_hits = rest.pop(0) if isinstance(exclude, str) else {}
    target_hits = rest.pop(0) if regex_target else {}
    layers = config.get("layers_to_transform")
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    linear = {n for n, is_linear in factored.items() if is_linear and n != OUTPUT_LAYER}
    decision: dict[str, bool | str] = {}
    for i, key in enumerate(names):
        if (i in exclude_hits or (isinstance(exclude, list) and (
                key in exclude or any(key.endswith(f".{e}") for e in exclude)))
                or any(i in hits for hits in saved_hits)):
            decision[key] = "excluded"
        elif targets is None or targets == DUMMY:
            decision[key] = False
        elif isinstance(targets, str):
            decision[key] = key in linear if not regex_target else i in target_hits
        elif key in targets:
            decision[key] = True
        else:
            hit = any(key.endswith(f".{t}") for t in targets)
            if hit and using_layers:
                hit = _in_layers(key, i, layers, patterns, rest)
            decision[key] = hit
    return decision


def _in_layers(
    key: str, i: int, layers: int | list[int], patterns: list[str], hits: list[dict[int, str | None]]
) -> bool:
    """Whether the module's layer index (peft's first numbered segment) is one of ``layers``."""
    idx = None
    if not patterns:
        m = _LAYER.match(key)
        idx = m["idx"] if m else None
    else:
        idx = next((h[i] for h in hits if i in h), None)
    if idx is None:
        return False
    return int(idx) == layers if isinstance(layers, int) else int(idx) in layers
