"""Turning what the user typed into a local folder: the path itself, or a Hub repo's snapshot."""

from __future__ import annotations

from pathlib import Path

from ..errors import NotFoundError
from ..formats.files import hub_repo_of
from .hub import cache_storage, download_input
from .inputs import Resolved, hub_repo_id, is_repo_id


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
    if isinstance(given, Path) or path.exists() or not is_repo_id(text):
        return path
    return download_input(text, role=role, **hub).path


def input_region(given: str | Path, role: str = "input") -> list[Path]:
    """Every place an input's bytes live, resolved: what OUT must stay out of, and not hold.

    A local folder, plus the Hub cache repository when it is a snapshot, plus the targets of
    its top-level symlinks; a Hub repo id, its cache repository (computed, no request). An input
    that does not exist has no region: resolving it fails later, in its own words.
    """
    try:
        text = hub_repo_id(given, role)
    except NotFoundError:
        return []
    if text is not None:
        return [cache_storage(text).resolve()]
    try:
        root = Path(str(given)).expanduser().resolve()
    except (OSError, RuntimeError):
        return []
    region = [root]
    repo = hub_repo_of(root)
    if repo is not None:
        region.append(repo)
    if root.is_dir():
        for entry in root.iterdir():
            try:
                if entry.is_symlink() and root not in (target := entry.resolve()).parents:
                    region.append(target)
            except (OSError, RuntimeError):
                continue
    return region
