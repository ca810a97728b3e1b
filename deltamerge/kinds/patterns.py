"""peft's ``rank_pattern`` / ``alpha_pattern`` keys, matched against module names with a deadline.

An adapter's config is a stranger's file, and its keys are regular expressions: one that is not
valid must be a one-line error, and one that backtracks catastrophically (``(.|.)*(.|.)*Z``) must
not hang the tool. Python's ``re`` cannot be interrupted (a thread cannot be stopped, and no
signal handler runs inside a match), so every key is compiled here, where a syntax error is
cheap to name, and matched against every module name in a child process that is killed after
:data:`MATCH_SECONDS`. The child imports only ``re`` and ``json`` and is started only for
adapters that have patterns. Refusing "dangerous" constructs instead was rejected: no simple
rule tells exponential patterns from safe ones, and it would refuse keys peft accepts.

The match is peft's ``get_pattern_key``: the first key ``k`` for which
``re.match(rf"(.*\\.)?({k})$", module)`` matches.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ..errors import FormatError, WorkError

MATCH_SECONDS = 10.0

_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
for key in job["keys"]:
    rx = re.compile(rf"(.*\.)?({key})$")
    print(json.dumps([i for i, m in enumerate(job["modules"]) if rx.match(m)]), flush=True)
"""


def peft_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def check_patterns(path: Path, field: str, patterns: dict[str, object]) -> None:
    """Every key must compile as peft will use it; an invalid one is named in one line."""
    for key in patterns:
        try:
            re.compile(peft_regex(key))
        except re.error as exc:  # its position would count the characters peft adds
            raise FormatError(
                f"{path}: {field} key {key[:80]!r} is not a valid regular expression ({exc.msg})"
            ) from None
        except (RecursionError, OverflowError, ValueError, MemoryError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise FormatError(
                f"{path}: {field} key {key[:80]!r} is not a valid regular expression ({reason})"
            ) from None


def match_patterns(
    path: Path, fields: dict[str, dict[str, float]], modules: list[str]
) -> dict[str, dict[str, float]]:
    """For each field, the value of its first key matching each module (modules matched by none
    are absent), as peft chooses; refused when the matching outlasts :data:`MATCH_SECONDS`."""
    keys = list(dict.fromkeys(k for patterns in fields.values() for k in patterns))
    if not keys or not modules:
        return {field: {} for field in fields}
    matched = _run_child(path, fields, keys, modules)
    found: dict[str, dict[str, float]] = {}
    for field, patterns in fields.items():
        values: dict[str, float] = {}
        for key, value in patterns.items():
            for i in matched[key]:
                values.setdefault(modules[i], value)
        found[field] = values
    return found


def _run_child(
    path: Path, fields: dict[str, dict[str, float]], keys: list[str], modules: list[str]
) -> dict[str, list[int]]:
    job = json.dumps({"keys": keys, "modules": modules})
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
    except OSError as exc:
        raise WorkError(f"{path}: cannot start a process to match its module patterns: {exc}") from None
    try:
        out, _ = child.communicate(job, timeout=MATCH_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        slow = keys[min(len(out.splitlines()), len(keys) - 1)]
        field = next(f for f, patterns in fields.items() if slow in patterns)
        raise FormatError(
            f"{path}: {field} key {slow[:80]!r} takes over {MATCH_SECONDS:g} s to match "
            f"{len(modules)} module names (a pattern that backtracks catastrophically?): "
            "peft would hang on it too; simplify the pattern"
        ) from None
    lines = out.splitlines()
    if child.returncode != 0 or len(lines) != len(keys):
        raise WorkError(f"{path}: matching its module patterns failed (status {child.returncode})")
    return {key: json.loads(line) for key, line in zip(keys, lines)}
