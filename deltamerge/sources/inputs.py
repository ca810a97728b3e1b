"""What the user typed, decided without any request: a local path, a Hub repo id, or neither.

A string that exists locally is a path. A string that looks like a path (starts with ``.``,
``/`` or ``~``, or has more than one ``/``) and does not exist is a "no such folder" error, never
a Hub request. Anything else of the form ``owner/name[@revision]`` is a Hub repo id, fetched by
:mod:`deltamerge.sources.hub`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NotFoundError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class Resolved:
    """A local folder, and where it came from (for provenance and model cards)."""

    path: Path
    given: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict:
        """Where an input came from; a local folder by name only, since results get pushed."""
        if self.repo_id is None:
            return {"folder": self.path.resolve().name}
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def looks_like_path(text: str) -> bool:
    repo = text.split("@", 1)[0]  # a revision may hold slashes: refs/pr/1
    return text.startswith((".", "/", "~")) or repo.count("/") > 1 or "\\" in text


def is_repo_id(text: str) -> bool:
    """Whether text (not a path on disk) reads as ``owner/name[@revision]``, as the Hub spells one."""
    return not looks_like_path(text) and REPO_ID.fullmatch(text) is not None


def hub_repo_id(given: str | Path, role: str = "input") -> str | None:
    """None for an existing local path, the text for a Hub repo id; else "no such folder".

    Decided without any request, so callers can check every input before reaching the Hub.
    """
    text = str(given)
    if Path(text).expanduser().exists():
        return None
    if isinstance(given, Path) or not is_repo_id(text):
        raise NotFoundError(f"{text}: no such folder ({role})")
    return text


def need_folders(inputs: list[tuple[str | Path, str]]) -> None:
    """Each ``(given, role)`` that exists is a folder: a weight file given instead has no config,
    manifest or index, and every command that takes a folder refuses it in these words."""
    for given, role in inputs:
        path = Path(str(given)).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(
                f"{given}: a file, not a folder: {role.upper()} is the folder that holds the model's "
                f"files (give {path.parent})"
            )
