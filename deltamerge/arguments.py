"""Checks of the library's arguments, shared by every public entry point.

The CLI's options are typed by click; a library caller can pass anything, and a wrong type would
otherwise surface deep in a run as a ``TypeError`` or ``AttributeError``, or be used (an
``extra_files`` name of ``../x`` writes outside OUT). Each check raises an :class:`InputError`
that names the argument, before any file is read or written. Kept free of torch so that
importing it stays cheap: dtypes are checked by ``dtypes.parse_user_dtype``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError
from .sizes import parse_size

PathLike = str | os.PathLike
HUB_KEYS = ("endpoint", "token", "api")


def _shown(value: object) -> str:
    """The value as the message shows it: its type, and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def path(name: str, value: object) -> str | Path:
    """A path (or Hub repo id) given as ``str`` or ``os.PathLike``, never empty; a ``str`` comes
    back as it is, since it may be a repo id."""
    if isinstance(value, os.PathLike) and not isinstance(value, Path):
        value = Path(os.fspath(value))
    if not isinstance(value, (str, Path)):
        raise InputError(f"{name} must be a path (str or pathlib.Path), not {_shown(value)}")
    if not str(value) or "\0" in str(value):
        raise InputError(f"{name} must be a path, not {str(value)!r}")
    return value


def optional_path(name: str, value: object) -> str | Path | None:
    return None if value is None else path(name, value)


def paths(name: str, value: object) -> list[str | Path]:
    """One path, or a sequence (list, tuple) of them."""
    if isinstance(value, (str, os.PathLike)):
        items: list[object] = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    else:
        raise InputError(f"{name} must be a path or a list of paths, not {_shown(value)}")
    return [path(f"{name}[{i}]", v) for i, v in enumerate(items)]


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, not {_shown(value)}")
    return value


def text(
    name: str, value: object, choices: Sequence[str] | None = None, optional: bool = True
) -> str | None:
    """A string (None too when ``optional``), one of ``choices`` when they are given."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, not {_shown(value)}")
    if choices is not None and value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def integer(name: str, value: object, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{name} must be an integer, not {_shown(value)}")
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, not {value}")
    return value


def number(name: str, value: object) -> float | None:
    """A positive finite number (an int is one)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"{name} must be a number, not {_shown(value)}")
    if not 0 < value < float("inf"):
        raise InputError(f"{name} must be a positive number, not {value!r}")
    return value


def size(name: str, value: object) -> int | None:
    """A size in bytes: an int, or a string such as ``"24MB"`` (what the CLI accepts)."""
    if value is None:
        return None
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise InputError(f"{name} must be a size (bytes as an int, or e.g. '5GB'), not {_shown(value)}")
    try:
        return parse_size(value)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None


def progress(value: object) -> bool | Callable[[int, int], None]:
    if not isinstance(value, bool) and not callable(value):
        raise InputError(f"progress must be True, False or a function (done, total), not {_shown(value)}")
    return value  # type: ignore[return-value]


def hub(value: object) -> dict[str, Any]:
    """The Hub options: ``endpoint`` (a URL), ``token`` (a string, or False for none), ``api``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"hub must be a dict of {', '.join(HUB_KEYS)}, not {_shown(value)}")
    unknown = [k for k in value if k not in HUB_KEYS]
    if unknown:
        raise InputError(f"hub: unknown key {unknown[0]!r}: use {', '.join(HUB_KEYS)}")
    text("hub['endpoint']", value.get("endpoint"))
    token("hub['token']", value.get("token"))
    api("hub['api']", value.get("api"))
    return dict(value)


def token(name: str, value: object) -> None:
    """A Hub token: a string, False for none, True or None for the saved one."""
    if value is not None and not isinstance(value, (str, bool)):
        raise InputError(f"{name} must be a string, True or False, not {_shown(value)}")


def api(name: str, value: object) -> None:
    """A ``huggingface_hub.HfApi`` (checked by what is used of it: huggingface_hub stays unloaded)."""
    if value is not None and not callable(getattr(value, "model_info", None)):
        raise InputError(f"{name} must be a huggingface_hub.HfApi, not {_shown(value)}")


def extra_files(value: object) -> dict[str, Path | bytes]:
    """Files to add to OUT: a plain file name (nothing that leads out of OUT, or into a folder of
    it) mapped to the bytes, or the path of a file to copy."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"extra_files must be a dict of file names to bytes or paths, not {_shown(value)}")
    files: dict[str, Path | bytes] = {}
    for key, src in value.items():
        where = f"extra_files[{key!r}]"
        if not isinstance(key, str) or key in ("", ".", "..") or "\0" in key \
                or key != os.path.basename(key):
            raise InputError(f"{where}: a file name must be a plain name inside OUT (no folder, "
                             "'..' or absolute path)")
        if isinstance(src, (bytes, bytearray)):
            files[key] = bytes(src)
            continue
        source = Path(path(where, src)).expanduser()
        if not source.is_file():
            raise InputError(f"{where}: {source}: no such file")
        files[key] = source
    return files
