"""Fault injection for the crash tests: kill this process at a named point of a run.

``DELTAMERGE_KILL_AT=point[:n]`` sends SIGKILL to the process when the run reaches that point
for the n-th time (points: ``header`` after a shard's header is written, ``block`` after a
block is written, ``shard`` after a shard is journaled, ``publish`` just before the final rename).
``DELTAMERGE_KILL_SIGNAL=TERM`` (or ``INT``) sends that signal instead, to test clean stops.
Nothing happens unless the variable is set; it exists so tests can prove ``--resume`` works from
any moment a real crash could strike.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def reached(point: str) -> None:
    target = os.environ.get("DELTAMERGE_KILL_AT")
    if not target:
        return
    _seen[point] += 1
    name, _, count = target.partition(":")
    if name == point and _seen[point] == int(count or 1):
        sig = os.environ.get("DELTAMERGE_KILL_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
