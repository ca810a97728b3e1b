"""Progress: a bar in bytes that names what is at work and gives an ETA, a callback, or nothing.

The main pass of a run gets one bar (:func:`make_progress`); the engine tells it, through
``at``, which shard and tensor it is writing. The steps before it that take long too (checking
downloads against the Hub, the md5 of Meta's checklist, re-checking what a resumed run keeps)
get bars of their own from :func:`step_bar`, shown when the entry point running them was asked
for bars: entry points are wrapped in :func:`reports_progress`, which says so to every step
below them without passing an argument through each layer. Bars go to stderr, and only to a
terminal (tqdm's ``disable=None``); library callers who pass a callback get
``callback(done_bytes, total_bytes)`` for the main pass and no bars.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

ProgressArg = bool | Callable[[int, int], None]
_F = TypeVar("_F", bound=Callable[..., Any])
_ASKED: ContextVar[ProgressArg] = ContextVar("deltamerge_progress", default=False)


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def at(self, where: str) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def update(self, n: int) -> None:
        pass

    def at(self, where: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    """Library callers get ``callback(done_bytes, total_bytes)`` instead of a bar."""

    def __init__(self, fn: Callable[[int, int], None], total: int):
        self.fn, self.total, self.done = fn, total, 0
        self._lock = threading.Lock()  # xor-files decodes several files at once

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        self.fn(done, self.total)

    def at(self, where: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar whose postfix names the shard and tensor (or file) at work."""

    def __init__(self, total: int, desc: str, unit: str):
        from tqdm import tqdm

        scaled = unit == "B"
        self._bar = tqdm(total=total, unit=unit, unit_scale=scaled,
                         unit_divisor=1024 if scaled else 1000, desc=desc, dynamic_ncols=True,
                         leave=True, disable=None)
        self._lock = threading.Lock()  # updated from the engine's and the decoders' threads

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def at(self, where: str) -> None:
        self._bar.set_postfix_str(where, refresh=False)

    def close(self) -> None:
        self._bar.close()


def make_progress(progress: ProgressArg, total: int, desc: str, unit: str = "B") -> Progress:
    if callable(progress):
        return _Callback(progress, total)
    if not progress:
        return _Silent()
    return _Bar(total, desc, unit)


def reports_progress(fn: _F) -> _F:
    """Run an entry point with its ``progress`` argument known to :func:`step_bar` below it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _ASKED.set(kwargs.get("progress", False) or _ASKED.get())
        try:
            return fn(*args, **kwargs)
        finally:
            _ASKED.reset(token)

    return wrapper  # type: ignore[return-value]


def step_bar(total: int, desc: str, unit: str = "B") -> Progress:
    """A bar for a long step before the main pass, if the running entry point shows bars."""
    return make_progress(_ASKED.get() is True and total > 0, total, desc, unit)
