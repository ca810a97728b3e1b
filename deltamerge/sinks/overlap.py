"""Inputs are never written: OUT, its partial folder and its lock file stay clear of every input.

Checked on resolved paths before any work, so no spelling gets round it: a relative path, ``..``,
a symlinked OUT or parent, a Hub repo id (whose files live in the Hub cache). OUT may not be an
input, lie inside one (the partial folder and the lock beside it would too), or hold one
(``--force`` would replace it).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .folder import partial_dir
from .lock import lock_path


def out_entry(out: Path) -> Path:
    """OUT's own directory entry, its parent resolved: a symlink at OUT is the entry replaced."""
    if out.name in ("", ".", ".."):
        return out.resolve()
    return out.parent.resolve() / out.name


def refuse_overlap(out: Path, inputs: list[tuple[str, list[Path]]]) -> None:
    """``inputs``: each input as the user gave it, with its region (``sources.resolve.input_region``)."""
    entry = out_entry(out)
    written = [(entry, ""), (partial_dir(entry), f"its partial folder {partial_dir(entry)} "),
               (lock_path(entry), f"its lock file {lock_path(entry)} ")]
    if entry.is_symlink():
        written.append((entry.resolve(), f"a symlink to {entry.resolve()}, which "))
    for given, region in inputs:
        for place in region:
            for path, label in written:
                what = _relation(path, place)
                if what is None:
                    continue
                files = "" if place == region[0] else f" (its files are in {place})"
                raise InputError(
                    f"{out}: {label}{what} the input folder {given}{files}: inputs are never "
                    f"written, choose another OUT"
                )


def _relation(written: Path, place: Path) -> str | None:
    if written == place:
        return "is"
    if place in written.parents:
        return "is inside"
    if written in place.parents:
        return "holds"
    return None
