"""Turning what the user typed into a local folder.

A string that exists locally is a path. A string that looks like a path (starts with ``.``,
``/`` or ``~``, or has more than one ``/``) and does not exist is a "no such folder" error, never
a Hub request. Anything else of the form ``owner/name[@revision]`` is a Hub repo id, fetched by
:mod:`deltamerge.hub`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import NotFoundError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class Resolved:
    """A local folder, and where it came from (for provenance and model cards)."""

    path: Path
    given: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict:
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def resolve_input(given: str | Path, role: str = "input", **hub: object) -> Resolved:
    """A local path wins; then a repo id; then a "no such folder" error."""
    text = str(given)
    path = Path(text).expanduser()
    if path.exists():
        return Resolved(path, text)
    if isinstance(given, Path) or looks_like_path(text) or not _REPO_ID.fullmatch(text):
        raise NotFoundError(f"{text}: no such folder ({role})")
    from .hub import download_input

    return download_input(text, role=role, **hub)
