"""Regular expressions from an adapter's config, matched against module names with a deadline.

An adapter's config is a stranger's file, and several of its fields are regular expressions
(``rank_pattern`` / ``alpha_pattern`` keys; ``target_modules`` or ``exclude_modules`` given as
a string; ``modules_to_save`` and ``layers_pattern`` entries, which peft pastes into regexes of
its own): one that is not valid must be a one-line error, and one that backtracks
catastrophically (``(.|.)*(.|.)*Z``) must not hang the tool. Python's ``re`` cannot be
interrupted (a thread cannot be stopped, and no signal handler runs inside a match), so every
expression is compiled here, where a syntax error is cheap to name, and matched against every
module name in a child process that is killed after :data:`MATCH_SECONDS`. The child imports
only ``re`` and ``json`` and is started only for adapters that have such fields. Refusing
"dangerous" constructs instead was rejected: no simple rule tells exponential patterns from
safe ones, and it would refuse keys peft accepts.

A :class:`Rule` is one of peft's regexes and how peft applies it (``re.match`` or
``re.fullmatch``). The rank/alpha match is peft's ``get_pattern_key``: the first key ``k`` for
which ``re.match(rf"(.*\\.)?({k})$", module)`` matches.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, WorkError

MATCH_SECONDS = 10.0

# Per rule, the names it matches: [index, the match's "idx" group (layers_pattern) or null].
_CHILD = r"""
import json, re, sys
job = json.load(sys.stdin)
for regex, how in job["rules"]:
    rx = re.compile(regex)
    test = rx.fullmatch if how == "fullmatch" else rx.match
    found = []
    for i, name in enumerate(job["names"]):
        m = test(name)
        if m:
            found.append([i, m.groupdict().get("idx")])
    print(json.dumps(found), flush=True)
"""


@dataclass(frozen=True)
class Rule:
    """One regex peft builds from a config field, and how peft applies it to a module name."""

    field: str  # the config field it comes from, for messages
    key: str  # what the config wrote (the key or entry), for messages
    regex: str
    how: str = "match"  # "match" | "fullmatch"


def peft_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def check_rule(path: Path, rule: Rule) -> None:
    """The rule must compile as peft will use it; an invalid one is named in one line."""
    try:
        re.compile(rule.regex)
    except re.error as exc:  # its position would count the characters peft adds
        raise FormatError(
            f"{path}: {rule.field} {rule.key[:80]!r} is not a valid regular expression ({exc.msg})"
        ) from None
    except (RecursionError, OverflowError, ValueError, MemoryError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FormatError(
            f"{path}: {rule.field} {rule.key[:80]!r} is not a valid regular expression ({reason})"
        ) from None


def check_patterns(path: Path, field: str, patterns: dict[str, object]) -> None:
    """Every key must compile as peft will use it; an invalid one is named in one line."""
    for key in patterns:
        check_rule(path, Rule(f"{field} key", key, peft_regex(key)))


def match_patterns(
    path: Path, fields: dict[str, dict[str, float]], modules: list[str]
) -> dict[str, dict[str, float]]:
    """For each field, the value of its first key matching each module (modules matched by none
    are absent), as peft chooses; refused when the matching outlasts :data:`MATCH_SECONDS`."""
    keys = list(dict.fromkeys(k for patterns in fields.values() for k in patterns))
    if not keys or not modules:
        return {field: {} for field in fields}
    field_of = {k: next(f for f, patterns in fields.items() if k in patterns) for k in keys}
    found_by_key = run_rules(path, [Rule(f"{field_of[k]} key", k, peft_regex(k)) for k in keys],
                             modules)
    matched = dict(zip(keys, found_by_key))
    found: dict[str, dict[str, float]] = {}
    for field, patterns in fields.items():
        values: dict[str, float] = {}
        for key, value in patterns.items():
            for i in matched[key]:
                values.setdefault(modules[i], value)
        found[field] = values
    return found


def run_rules(path: Path, rules: list[Rule], names: list[str]) -> list[dict[int, str | None]]:
    """Per rule, the names it matches (by index) with their ``idx`` group, within the deadline."""
    if not rules or not names:
        return [{} for _ in rules]
    for rule in rules:
        check_rule(path, rule)
    job = json.dumps({"rules": [[r.regex, r.how] for r in rules], "names": names})
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
        slow = rules[min(len(out.splitlines()), len(rules) - 1)]
        raise FormatError(
            f"{path}: {slow.field} {slow.key[:80]!r} takes over {MATCH_SECONDS:g} s to match "
            f"{len(names)} module names (a pattern that backtracks catastrophically?): "
            "peft would hang on it too; simplify the pattern"
        ) from None
    lines = out.splitlines()
    if child.returncode != 0 or len(lines) != len(rules):
        raise WorkError(f"{path}: matching its module patterns failed (status {child.returncode})")
    return [{i: idx for i, idx in json.loads(line)} for line in lines]


def suffix_pattern_values(
    path: Path, field: str, pattern: dict[str, int], modules: list[str], default: int
) -> dict[str, int]:
    """Each module's value from a pattern field FourierFT and C3A read their own way (peft's
    ``_create_and_replace``): the first key ``k`` with ``re.match(rf".*\\.{k}$", module)``,
    else the module's own name as a key, else ``default``."""
    keys = list(pattern)
    hits = run_rules(path, [Rule(f"{field} key", k, rf".*\.{k}$") for k in keys], modules)
    found = {}
    for i, module in enumerate(modules):
        key = next((k for k, h in zip(keys, hits) if i in h), module)
        found[module] = pattern.get(key, default)
    return found
