"""The marks make-delta writes into each weight file's safetensors header: what the delta is.

Without them a XOR delta downloaded without its ``deltamerge.json`` (``*.safetensors`` only)
reads as an additive one, and applying it gives noise with exit status 0. So every weight file
make-delta writes says, in its ``__metadata__``, its kind (``deltamerge.kind``) and which delta
it belongs to (``deltamerge.delta_id``, also recorded as the manifest's ``delta_id``). A shard is
written before the manifest exists, so the id cannot be the manifest's digest: it is a digest of
the run's fingerprint (``engine/journal.py``: the inputs' files, the options, the shard layout),
which is what ``--resume`` requires to be unchanged, so a resumed run writes the same marks, and
the same command on the same files writes the same bytes.

A folder whose files carry no marks at all (FastChat's deltas, any delta older than the marks)
is left to the rest of ``detect.py``; marks that are partial, disagree between shards, or
contradict the manifest are refused, never guessed around.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeltaMergeError, FormatError
from ..formats.safetensors import read_header
from ..names import MARKED_KINDS
from ..sources.folders import detect_layout

PREFIX = "deltamerge."
KIND_KEY = "deltamerge.kind"
ID_KEY = "deltamerge.delta_id"
_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Marks:
    """What a delta's weight files say they are: its kind, and the id of the run that made it."""

    kind: str
    delta_id: str
    where: str  # a file that carries them, for messages

    @property
    def said_by(self) -> str:
        """Where the kind is written, as a message names it."""
        return f"weight files' marks ({KIND_KEY} in {Path(self.where).name})"

    def metadata(self) -> dict[str, str]:
        return {KIND_KEY: self.kind, ID_KEY: self.delta_id}


def delta_id(fingerprint_digest: str) -> str:
    """The id of the delta a make-delta run writes, from the run's fingerprint (not the
    fingerprint itself: the journal's key stays the journal's)."""
    return hashlib.sha256(f"deltamerge delta\0{fingerprint_digest}".encode()).hexdigest()


def marks_of(where: str, metadata: Mapping[str, str]) -> Marks | None:
    """One file's marks; None when its header has none. A header that has some but not both,
    or a kind make-delta does not write, cannot say what the delta is: refused."""
    ours = {k: v for k, v in metadata.items() if k.startswith(PREFIX)}
    if not ours:
        return None
    kind, ident = ours.get(KIND_KEY), ours.get(ID_KEY)
    if kind not in MARKED_KINDS or not isinstance(ident, str) or not _ID.fullmatch(ident):
        raise FormatError(
            f"{where}: its header's deltamerge marks are damaged ({KIND_KEY}={kind!r}, "
            f"{ID_KEY}={ident!r}): what kind of delta it is cannot be told; download it again"
        )
    return Marks(kind, ident, where)


def agreed_marks(files: Mapping[str, Mapping[str, str]]) -> Marks | None:
    """The marks of a delta's weight files (``files``: each file's header metadata), which must
    be one delta's: every file marked alike, or none marked."""
    found = {name: marks_of(name, metadata) for name, metadata in files.items()}
    marked = [m for m in found.values() if m is not None]
    if not marked:
        return None
    first = marked[0]
    for name, marks in found.items():
        if marks is None:
            raise FormatError(
                f"{name}: carries no deltamerge marks, but {first.where} is marked as "
                f"{_describe(first)}: the files are not of one delta; download the delta again"
            )
        if (marks.kind, marks.delta_id) != (first.kind, first.delta_id):
            raise FormatError(
                f"{name}: is marked as {_describe(marks)}, but {first.where} as "
                f"{_describe(first)}: the files are of different deltas; download the delta again"
            )
    return first


def weight_headers(folder: Path) -> dict[str, dict[str, str]] | None:
    """The header metadata of each safetensors weight file of ``folder`` (the files
    ``detect_layout`` reads; none for other formats), or None when its weights cannot be listed
    or parsed: the opening says why, and a Hub snapshot may not hold its weights yet."""
    try:
        layout = detect_layout(folder)
        if layout.format != "safetensors":
            return {}
        return {str(path): read_header(path).metadata for path in layout.files}
    except DeltaMergeError:
        return None


def check_manifest_marks(
    folder: Path | str, marks: Marks | None, kind: str, manifest_id: str | None, manifest: str
) -> None:
    """The weight files' marks must be those of the manifest beside them (``kind`` and
    ``manifest_id`` are its ``kind`` and ``delta_id``; ``manifest`` its name, for messages)."""
    if marks is None:
        if manifest_id is not None:
            raise FormatError(
                f"{folder}: {manifest} is of delta {manifest_id[:12]}, but its weight files "
                "carry no deltamerge marks: they are not the files it describes"
            )
        return
    if marks.kind != kind:
        raise FormatError(
            f"{marks.where}: marks its delta as {marks.kind}, but {manifest} says {kind}: the "
            "weights and the manifest are of different deltas; download the delta again"
        )
    if manifest_id is not None and marks.delta_id != manifest_id:
        raise FormatError(
            f"{marks.where}: is marked as delta {marks.delta_id[:12]}, but {manifest} is of delta "
            f"{manifest_id[:12]}: the weights and the manifest are from different make-delta "
            "runs; download the delta again"
        )


def _describe(marks: Marks) -> str:
    return f"delta {marks.delta_id[:12]} ({marks.kind})"
