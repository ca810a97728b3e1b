"""Ctrl-C and SIGTERM for the command line: a clean end from the process's first instant to its last.

:func:`install` is the first thing the ``deltamerge`` process does, before click or torch is
imported. The signals then act by where the process is:

* before a command's work starts and after it ends (start-up, parsing, printing the summary,
  exiting), the process ends at once: the one-line message, exit 130 or 143. A raised
  KeyboardInterrupt there would reach click (which prints "Aborted!" and exits 1) or the
  interpreter (a traceback);
* while a command runs (:func:`running`, entered by the CLI's error handling), SIGINT raises
  KeyboardInterrupt and SIGTERM :class:`~deltamerge.errors.Terminated`, so the run stops its
  threads and keeps its partial folder for ``--resume`` (docs/design.md, "Crashes, signals,
  resume"); a second signal while the first is handled ends the process at once (a partial
  folder is then left as a kill leaves it, which ``--resume`` re-checks);
* inside an import the signal waits until the import is done. An exception raised in an
  import leaves a half-initialised extension module that cannot be loaded again ("cannot load
  module more than once per process"), and torch swallows one raised while it imports numpy.

A child of a background job starts with SIGINT ignored, as a shell's convention wants: a signal
ignored at start-up stays ignored.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import Terminated

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_RETRY_SECONDS = 0.02  # how often a signal held during an import is looked at again
_state: dict[str, object] = {"phase": "start", "pending": None}
_PHASE_MESSAGES = {
    "start": "interrupted; nothing was written to OUT",
    "stopping": "interrupted again: stopped at once; a partial result, if any, is kept for --resume",
    "end": "interrupted after the command had ended",
}


def install() -> None:
    """Take SIGINT and SIGTERM over for this process (the CLI's entry, never the library)."""
    handled = False
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
            handled = True
    if handled and hasattr(signal, "setitimer"):  # Windows has no SIGALRM nor setitimer
        signal.signal(signal.SIGALRM, _on_retry)


@contextmanager
def running() -> Iterator[None]:
    """The span of a command's work: signals raise in it, and end the process before and after."""
    _state["phase"] = "run"
    try:
        yield
    finally:
        if _state["phase"] == "run":
            _state["phase"] = "end"


def _on_signal(signum: int, frame: FrameType | None) -> None:
    phase = _state["phase"]
    if phase != "run":
        _end(signum, _PHASE_MESSAGES[str(phase)])
    if _importing(frame) and hasattr(signal, "setitimer"):
        _state["pending"] = signum
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)
        return
    _state["phase"] = "stopping"
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_retry(signum: int, frame: FrameType | None) -> None:
    """SIGALRM: look again at a signal held while an import ran."""
    pending = _state["pending"]
    if isinstance(pending, int):
        _state["pending"] = None
        _on_signal(pending, frame)


def _importing(frame: FrameType | None) -> bool:
    """Whether the main thread is inside an import (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _end(signum: int, message: str) -> None:
    """End the process now: what stdout holds, the one line, the signal's status.

    ``os._exit``: no Python cleanup runs, so nothing can raise again, and no thread still inside
    torch is torn down by the interpreter's finalisation. The lock beside OUT is released by the
    kernel, and a partial folder is one that ``--resume`` re-checks, as after a kill.
    """
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed pipe or a write this signal interrupted
        pass
    os.write(2, f"deltamerge: error: {message}\n".encode())
    os._exit(128 + int(signum))
