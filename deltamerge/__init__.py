"""deltamerge: rebuild models from published delta weights, streaming, with checksums end to end.

The library API mirrors the CLI: :func:`apply_delta`, :func:`make_delta`, :func:`convert`, and
the checksum functions; every failure is a :class:`DeltaMergeError`. Names are imported on first
use, so ``deltamerge --help`` and ``--version`` answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_delta": "apply",
    "ApplyResult": "apply",
    "make_delta": "make_delta",
    "MakeDeltaResult": "make_delta",
    "convert": "convert",
    "checksum": "checks",
    "Checksum": "checks",
    "verify": "checks",
    "VerifyReport": "checks",
    "inspect": "checks",
    "InspectReport": "checks",
    "diff": "checks",
    "DiffReport": "checks",
    "push_to_hub": "hub",
    "PushResult": "hub",
    "DeltaMergeError": "errors",
    "DiskSpaceError": "errors",
    "FormatError": "errors",
    "InputError": "errors",
    "InterruptedRun": "errors",
    "MismatchError": "errors",
    "NotFoundError": "errors",
    "OutputExistsError": "errors",
    "UnsupportedError": "errors",
    "VerificationError": "errors",
    "WorkError": "errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltamerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
