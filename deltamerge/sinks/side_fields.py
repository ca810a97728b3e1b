"""Fields of a model's side files (config.json, the tokenizer's and generation settings), checked.

The output writers (Meta's layout, GGUF) read numbers and names from files a stranger wrote; a
field of the wrong type would surface as a ``TypeError`` or ``ZeroDivisionError`` deep in the
writer, or be written. Both writers check the fields they read here, first, so each is one
:class:`FormatError` naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import FormatError

Where = str | Path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def positive_int(obj: Mapping[str, object], key: str, where: Where, default: int | None = None) -> int:
    """``obj[key]`` (``default`` when absent), which must be an integer above zero."""
    value = obj.get(key, default)
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise FormatError(f"{where}: {key!r} must be a positive integer, found {_short(value)}")
    return value  # type: ignore[return-value]


def positive_number(
    obj: Mapping[str, object], key: str, where: Where, default: float | None = None
) -> float:
    """``obj[key]`` (``default`` when absent), which must be a finite number above zero."""
    value = obj.get(key, default)
    if not _is_number(value) or not value > 0:  # type: ignore[operator]
        raise FormatError(f"{where}: {key!r} must be a positive number, found {_short(value)}")
    return value  # type: ignore[return-value]


_KINDS = {
    "positive_ints": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "ints": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    # a special token's id: Llama 3.1 and Gemma 3 list several end-of-sequence ids
    "token_ids": (lambda v: (_is_int(v) and v >= 0) or (
        isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
        "a non-negative integer or a list of them"),
    "positive_numbers": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "numbers": (_is_number, "a number"),
    "strings": (lambda v: isinstance(v, str), "a string"),
    "flags": (lambda v: isinstance(v, bool), "true or false"),
    "objects": (lambda v: isinstance(v, Mapping), "an object"),
}


def check_fields(obj: Mapping[str, object], where: Where, **kinds: Iterable[str]) -> None:
    """Each field named under a kind (``positive_ints``, ``ints``, ``token_ids``,
    ``positive_numbers``, ``numbers``, ``strings``, ``flags``, ``objects``) is absent, null, or of
    that kind."""
    for kind, keys in kinds.items():
        ok, what = _KINDS[kind]
        for key in keys:
            value = obj.get(key)
            if value is not None and not ok(value):
                raise FormatError(f"{where}: {key!r} must be {what}, found {_short(value)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
