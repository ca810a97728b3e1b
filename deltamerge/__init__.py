"""deltamerge: rebuild models from published delta weights, streaming, with checksums end to end.

The library API mirrors the CLI: :func:`apply_delta`, :func:`make_delta`, and the checksum
functions; every failure is a :class:`DeltaMergeError`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .apply import ApplyResult, apply_delta  # noqa: E402
from .errors import (  # noqa: E402
    DeltaMergeError,
    FormatError,
    InputError,
    MismatchError,
    NotFoundError,
    OutputExistsError,
    UnsupportedError,
    VerificationError,
    WorkError,
)
from .make_delta import MakeDeltaResult, make_delta  # noqa: E402

__all__ = [
    "ApplyResult",
    "DeltaMergeError",
    "FormatError",
    "InputError",
    "MakeDeltaResult",
    "MismatchError",
    "NotFoundError",
    "OutputExistsError",
    "UnsupportedError",
    "VerificationError",
    "WorkError",
    "__version__",
    "apply_delta",
    "make_delta",
]
