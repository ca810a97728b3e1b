"""Turning what the user typed into a local folder: the path itself, or a Hub repo's snapshot."""

from __future__ import annotations

from pathlib import Path

from .hub import download_input
from .inputs import REPO_ID, Resolved, hub_repo_id, looks_like_path


def resolve_input(given: str | Path, role: str = "input", **hub: object) -> Resolved:
    """A local path wins; then a repo id; then a "no such folder" error."""
    text = hub_repo_id(given, role)
    if text is None:
        return Resolved(Path(str(given)).expanduser(), str(given))
    return download_input(text, role=role, **hub)


def local_folder(given: str | Path, role: str = "input", **hub: object) -> Path:
    """The folder to read: ``given`` as a path, or the cached snapshot when it is a Hub repo id.

    Unlike :func:`resolve_input`, a missing path comes back as it is, for the reader to report
    in its own words; only a repo id that does not exist locally reaches the Hub.
    """
    text = str(given)
    path = Path(text).expanduser()
    if isinstance(given, Path) or path.exists() or looks_like_path(text) or not REPO_ID.fullmatch(text):
        return path
    return download_input(text, role=role, **hub).path
