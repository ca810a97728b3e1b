"""What a made delta's manifest says of its own files and of its base, for make-delta and the
LoRA extraction alike (both write a ``deltamerge.json``; neither imports the other)."""

from __future__ import annotations

from pathlib import Path

from .engine.journal import JOURNAL_NAME
from .engine.stream import WrittenFile
from .integrity.digest import file_digest
from .integrity.manifest import MANIFEST_NAME, FileEntry
from .sources.inputs import Resolved


def base_source(base: Resolved) -> dict:
    """Where the base came from, for the delta's card: the Hub repo and commit, or the folder's
    name (never a path: a delta is published)."""
    if base.repo_id is not None:
        return {"repo_id": base.repo_id, "revision": base.commit}
    return {"folder": base.path.resolve().name}


def file_table(folder: Path, written: dict[str, WrittenFile]) -> dict[str, FileEntry]:
    """Digest and size of every file of the delta; shards were hashed as they were written."""
    table = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in (MANIFEST_NAME, JOURNAL_NAME):
            size = path.stat().st_size
            shard = written.get(path.name)
            if shard is None:
                table[path.name] = FileEntry(file_digest(path), size)
            else:
                table[path.name] = FileEntry(shard.digest, size, (shard.header_size, shard.header_digest))
    return table
