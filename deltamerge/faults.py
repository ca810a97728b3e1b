"""Fault injection for the crash tests: kill or pause this process at a named point of a run.

``DELTAMERGE_KILL_AT=point[:n]`` sends SIGKILL to the process when the run reaches that point
for the n-th time (points: ``locked`` once the run holds OUT's lock, ``header`` after a shard's
header is written, ``block`` after a block is written, ``shard`` after a shard is journaled,
``publish`` just before the final rename, ``published`` just after it, in apply).
``DELTAMERGE_KILL_SIGNAL=TERM`` (or ``INT``) sends that signal instead, to test clean stops.
``DELTAMERGE_STOP_AT=point[:n]`` sends SIGSTOP instead, so a test can hold a run at that point
(and start a second run against it) until it sends SIGCONT.
Nothing happens unless a variable is set; they exist so tests can prove ``--resume`` and the
lock work from any moment a real crash or a second run could strike.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def reached(point: str) -> None:
    kill, stop = os.environ.get("DELTAMERGE_KILL_AT"), os.environ.get("DELTAMERGE_STOP_AT")
    if not kill and not stop:
        return
    _seen[point] += 1
    if _due(kill, point):
        sig = os.environ.get("DELTAMERGE_KILL_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
    if _due(stop, point):
        os.kill(os.getpid(), signal.SIGSTOP)


def _due(target: str | None, point: str) -> bool:
    if not target:
        return False
    name, _, count = target.partition(":")
    return name == point and _seen[point] == int(count or 1)
