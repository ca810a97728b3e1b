"""deltamerge: rebuild models from published delta weights, streaming, with checksums end to end.

The library API mirrors the CLI: :func:`apply_delta`, :func:`make_delta`, :func:`convert`, and
the checksum functions; every failure is a :class:`DeltaMergeError` (all of them importable from
:mod:`deltamerge.errors`). Names are imported on first use, so ``deltamerge --help`` and
``--version`` answer without loading torch; the ``if TYPE_CHECKING:`` block below imports the same
names for type checkers and IDEs (tests/project/test_public_api.py keeps the two lists equal).

No public name is also a submodule's name: importing a submodule sets it as an attribute of the
package, which would hide a function of the same name. So :func:`make_delta` lives in
``deltamerge.make``, :func:`convert` in ``deltamerge.conversion``, :func:`apply_delta` in
``deltamerge.apply``.
"""

from __future__ import annotations

import importlib

from .version import __version__

# typing (and with it re, collections, functools) is not imported at run time: the CLI's signal
# handlers go in just after this package loads, and the sooner the better (deltamerge.interrupts).
# Type checkers take any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .apply import apply_delta
    from .conversion import convert
    from .errors import (
        DeltaMergeError,
        DiskSpaceError,
        FormatError,
        InputError,
        InterruptedRun,
        MismatchError,
        NotFoundError,
        OutputBusyError,
        OutputExistsError,
        UnsupportedError,
        VerificationError,
        WorkError,
    )
    from .hub.push import PushResult, push_to_hub
    from .integrity.checks import (
        Checksum,
        DiffReport,
        InspectReport,
        VerifyReport,
        checksum,
        diff,
        inspect,
        verify,
    )
    from .make import make_delta
    from .results import ApplyResult, MakeDeltaResult

_EXPORTS = {
    "apply_delta": "apply",
    "ApplyResult": "results",
    "make_delta": "make",
    "MakeDeltaResult": "results",
    "convert": "conversion",
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
