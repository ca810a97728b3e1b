"""deltamerge: rebuild models from published delta weights, streaming, with checksums end to end.

The library API mirrors the CLI: :func:`apply_delta`, :func:`make_delta`, :func:`convert`, and
the checksum functions; every failure is a :class:`DeltaMergeError`. Names are imported on first
use, so ``deltamerge --help`` and ``--version`` answer without loading torch.
"""

from __future__ import annotations

import importlib
import sys
import types

from .version import __version__

# typing (and with it re, collections, functools) is not imported at run time: the CLI's signal
# handlers go in just after this package loads, and the sooner the better (deltamerge.interrupts).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_EXPORTS = {
    "apply_delta": "apply",
    "ApplyResult": "results",
    "make_delta": "make_delta",
    "MakeDeltaResult": "results",
    "convert": "convert",
    "checksum": "integrity.checks",
    "Checksum": "integrity.checks",
    "verify": "integrity.checks",
    "VerifyReport": "integrity.checks",
    "inspect": "integrity.checks",
    "InspectReport": "integrity.checks",
    "diff": "integrity.checks",
    "DiffReport": "integrity.checks",
    "push_to_hub": "hub.push",
    "PushResult": "hub.push",
    "DeltaMergeError": "errors",
    "DiskSpaceError": "errors",
    "FormatError": "errors",
    "InputError": "errors",
    "InterruptedRun": "errors",
    "MismatchError": "errors",
    "NotFoundError": "errors",
    "OutputBusyError": "errors",
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


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package, and ``make_delta`` and
    ``convert`` are both a function here and the module that defines it: without this, the first
    ``import deltamerge.make_delta`` anywhere (the CLI does) would hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
