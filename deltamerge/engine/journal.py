"""The journal of a run in progress, so a killed merge resumes where it stopped.

It lives in the partial folder beside OUT. Its first line fingerprints the plan (inputs, options,
shard layout); each later line records one shard that was written, fsynced and hashed, with the
digests of its tensors (and, for a sink that converts them, of the tensors as written). A resumed
run takes those lines as claims only: ``recheck.py`` reads each shard again and keeps those that
still hold what the journal says; it refuses to resume a partial folder whose plan differs from
its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..integrity.digest import ALGORITHMS, TensorDigest
from ..sinks.folder import append_line, claim_partial, missing_journal
from .plan import Shard

JOURNAL_NAME = "journal.jsonl"


# How each recorded option is named to the user when a resume is refused for it.
OPTION_NAMES = {
    "kind": "the delta kind", "dtype": "--dtype", "new_rows": "--new-rows",
    "verify": "verification (--no-verify)", "version": "the deltamerge version",
    "qlora": "--qlora", "qlora_dtype": "--qlora-dtype", "qlora_scope": "--qlora-scope",
    "qlora_kernel": "--qlora-kernel", "safe_merge": "--safe-merge", "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha", "lora_prefix": "--lora-prefix", "algorithm": "the digest algorithm",
}


@dataclass(frozen=True)
class Fingerprint:
    """Everything that decides the output's bytes, kept in parts so a refusal can say what differs."""

    digest: str
    parts: dict

    def differences(self, then: object) -> list[str]:
        """What differs from an earlier run's parts, in words (empty when they cannot tell)."""
        if not isinstance(then, dict):
            return []
        found = []
        if then.get("inputs") != self.parts["inputs"]:
            found.append(f"the inputs differ ({_listing(then.get('inputs'))} then, "
                         f"{_listing(self.parts['inputs'])} now)")
        before, now = then.get("options") or {}, self.parts["options"]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                found.append(f"{OPTION_NAMES.get(key, key)} differs ({_shown(before.get(key))} "
                             f"then, {_shown(now.get(key))} now)")
        files_then = then.get("files") if isinstance(then.get("files"), dict) else {}
        for name in sorted(set(files_then) | set(self.parts["files"])):
            if name not in self.parts["files"]:
                found.append(f"input file {name} is gone")
            elif name not in files_then:
                found.append(f"input file {name} is new")
            elif files_then[name] != self.parts["files"][name]:
                found.append(f"input file {name} changed (size or modification time)")
        if not found and then.get("layout") != self.parts["layout"]:
            found.append("the shard layout differs (another --max-shard-size?)")
        return found


def _shown(value: object) -> str:
    if value is None or value == "None":
        return "not given"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value).removeprefix("torch.")


def _listing(value: object) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else "unknown"


def fingerprint(inputs: list[Path], options: dict, layout: Iterable[str]) -> Fingerprint:
    """Input files (name, size, mtime; a symlink by its target; a folder by the files at its
    top), options, and the layout of the units the journal records (``shard_layout``'s lines, or
    a decoder's files)."""
    files = {}
    for given in inputs:
        paths = sorted(p for p in given.iterdir() if p.is_file()) if given.is_dir() else [given]
        for path in paths:
            st = path.stat()
            files[str(path)] = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    hashed = hashlib.sha256()
    for line in layout:
        hashed.update(line.encode())
    parts = {
        "inputs": [str(given) for given in inputs],
        "files": files,
        "options": json.loads(json.dumps(options, sort_keys=True, default=str)),
        "layout": hashed.hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return Fingerprint(digest, parts)


def shard_layout(shards: list[Shard]) -> Iterator[str]:
    """The plan's shards as the fingerprint takes them: each one's file and tensors."""
    for shard in shards:
        yield shard.filename
        for spec in shard.specs:
            yield f"{spec.name}\0{spec.dtype}\0{list(spec.shape)}\n"


@dataclass(frozen=True)
class Entry:
    """One journaled shard: its size and its tensors' digests, as the run that wrote it said
    (``written``: the tensors as a converting sink wrote them; empty otherwise)."""

    size: int
    digests: dict[str, TensorDigest]
    written: dict[str, TensorDigest] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what else a resumed run needs (make-delta's)


@dataclass
class Journal:
    """``recorded``: what an earlier run journaled (claims, re-checked before any is kept);
    ``done``: the shards this run keeps or finished, with digests this run computed."""

    path: Path
    fingerprint: str
    done: dict[str, dict[str, TensorDigest]] = field(default_factory=dict)
    recorded: dict[str, Entry] = field(default_factory=dict)
    parts: dict = field(default_factory=dict)  # the fingerprint's parts, kept in its first line

    @classmethod
    def start(cls, folder: Path, fp: Fingerprint) -> Journal:
        journal = cls(folder / JOURNAL_NAME, fp.digest, parts=fp.parts)
        journal._append({"fingerprint": fp.digest, "parts": fp.parts})
        return journal

    @classmethod
    def resume(cls, folder: Path, fp: Fingerprint, command: str) -> Journal:
        """The journal of an earlier run of the same plan; shards not fully recorded are redone."""
        path = folder / JOURNAL_NAME
        if not path.is_file():
            raise missing_journal(folder, JOURNAL_NAME)
        lines = path.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if not isinstance(head, dict):
            head = {}
        if head.get("fingerprint") != fp.digest:
            what = fp.differences(head.get("parts"))[:3]
            raise InputError(
                f"{folder}: was left by a run with other inputs or options"
                + (f": {'; '.join(what)}" if what else "")
                + f"; delete it, or run the original command with --resume ({command})"
            )
        journal = cls(path, fp.digest, parts=fp.parts)
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                digests = {n: read_digest(d) for n, d in entry["tensors"].items()}
                written = {n: read_digest(d) for n, d in entry.get("written", {}).items()}
                if not isinstance(entry["shard"], str):
                    raise TypeError("shard name")
                extra = entry.get("extra")
                journal.recorded[entry["shard"]] = Entry(
                    int(entry["size"]), digests, written, extra if isinstance(extra, dict) else {}
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                break  # a line cut short by the kill: that shard is redone
        return journal

    def restart(self, kept: dict[str, Entry]) -> None:
        """Replace the journal with the shards a re-check kept (a rename: never written through
        whatever was at its name)."""
        fresh = self.path.with_name(self.path.name + ".new")
        lines = [{"fingerprint": self.fingerprint, "parts": self.parts}] + [
            _line(shard, e.size, e.digests, e.written, e.extra) for shard, e in kept.items()
        ]
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, "".join(json.dumps(obj) + "\n" for obj in lines).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(fresh, self.path)
        self.recorded = {}
        self.done = {shard: e.digests for shard, e in kept.items()}

    def record(
        self, shard: str, size: int, digests: dict[str, TensorDigest],
        written: dict[str, TensorDigest] | None = None, extra: dict | None = None,
    ) -> None:
        """``written``: the tensors as a converting sink wrote them; ``extra``: what else a
        resumed run needs of the shard (make-delta: its file's digest)."""
        self.done[shard] = digests
        self._append(_line(shard, size, digests, written, extra))

    def _append(self, obj: dict) -> None:
        append_line(self.path, obj)


def _line(
    shard: str, size: int, digests: dict[str, TensorDigest],
    written: dict[str, TensorDigest] | None = None, extra: dict | None = None,
) -> dict:
    line = {"shard": shard, "size": size, "tensors": {n: d.to_json() for n, d in digests.items()}}
    if written:
        line["written"] = {n: d.to_json() for n, d in written.items()}
    return {**line, "extra": extra} if extra else line


def read_digest(obj: dict) -> TensorDigest:
    """A tensor digest as ``TensorDigest.to_json`` wrote it (the fingerprint fixes the algorithm)."""
    found = [a for a in ALGORITHMS if a in obj]
    if len(found) != 1:
        raise KeyError("one digest")
    algorithm = found[0]
    return TensorDigest(obj["dtype"], tuple(obj["shape"]), obj[algorithm], algorithm)


def open_partial(out: Path, fp: Fingerprint, resume: bool) -> tuple[Path, Journal]:
    """The partial folder and its journal: fresh, or an earlier run's when resuming."""
    tmp, left = claim_partial(out, resume)
    return tmp, Journal.resume(tmp, fp, "the same command") if left else Journal.start(tmp, fp)
