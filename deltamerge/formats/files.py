"""Files from strangers: JSON objects read within limits, names joined to a folder safely.

Index files, configs and manifests arrive from the Hub like weights do, so a JSON file is read
with a size limit and strict parsing, and every file name it gives is resolved inside its folder
and refused if it leaves it (``../``, absolute paths, symlinks pointing outside).
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from ..errors import FormatError, NotFoundError

# Index files, configs and manifests are kilobytes; a larger one is hostile or not JSON at all.
MAX_JSON_BYTES = 100_000_000
HUB_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")
LFS_POINTER_PREFIX = b"version https://git-lfs"
# JSON texts parsed while a run is planned (``json_parsed_once``): their bytes -> parsed value.
_PARSED: ContextVar[dict[bytes, Any] | None] = ContextVar("json_parsed", default=None)


def lfs_pointer_message(path: Path, what: str = "the weights") -> str:
    return f"{path}: a Git LFS pointer, not {what}: run `git lfs pull`"


def describe_download(path: Path, head: bytes, what: str = "the weights") -> str | None:
    """Name the usual wrong contents of a downloaded file (any format), from its first bytes."""
    if head.startswith(LFS_POINTER_PREFIX):
        return lfs_pointer_message(path, what)
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return f"{path}: an HTML page, not {what} (a failed download?): download it again"
    return None


def reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` hook: a name given twice is an error, not the last one silently winning."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def text_ok(text: str) -> bool:
    """JSON escapes can smuggle lone surrogates, which no file name or header may carry on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_for_reading(path: Path) -> int:
    """A read-only descriptor for a weight file; failing to open it is a :class:`FormatError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path}: not a regular file")
    return fd


def inside(folder: Path, name: str, what: Path) -> Path:
    """``folder/name``, refused when the name or a symlink leads outside ``folder``.

    The one symlink allowed out is the Hugging Face cache's own: a snapshot's files point into
    the ``blobs`` folder of the same repository.
    """
    if not valid_name(name):
        raise FormatError(f"{what}: invalid file name {name!r}")
    if leaves_folder(name):
        raise FormatError(f"{what}: file name {name!r} leaves the folder")
    path = folder / name
    try:
        root = folder.resolve()
        target = path.resolve()
    except (OSError, RuntimeError) as exc:
        raise FormatError(f"{what}: file name {name!r} cannot be resolved: {exc}") from None
    if target == root:
        raise FormatError(f"{what}: file name {name!r} names the folder itself")
    if root not in target.parents and not _hub_blob(root, target):
        raise FormatError(f"{what}: file name {name!r} leads outside the folder (symlink?)")
    return path


def stays_inside(folder: Path, path: Path) -> bool:
    """Whether ``path``, every symlink followed, is in ``folder`` or a Hub blob of its repository.

    A file deltamerge copies into a result (or push uploads) must be the folder's own: a symlink
    to ``~/.ssh/id_rsa`` beside the weights would otherwise travel with them.
    """
    try:
        root = folder.resolve()
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return root in target.parents or _hub_blob(root, target)


def valid_name(name: object) -> bool:
    """A file name deltamerge will join to a folder: a non-empty UTF-8 string without NUL."""
    return isinstance(name, str) and bool(name) and "\x00" not in name and text_ok(name)


def leaves_folder(name: str) -> bool:
    """Whether the name alone (before any symlink) leads out: absolute, or through ``..``."""
    candidate = Path(name)
    return candidate.is_absolute() or ".." in candidate.parts


def _hub_blob(root: Path, target: Path) -> bool:
    """Whether ``target`` is a blob of the Hub cache repository whose snapshot holds ``root``."""
    repo = hub_repo_of(root)
    return repo is not None and target.parent == repo / "blobs"


def hub_repo_of(root: Path) -> Path | None:
    """The Hub cache repository folder (``models--owner--name``) whose snapshot holds ``root``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            repo = folder.parent.parent
            return repo if repo.name.startswith(HUB_CACHE_PREFIXES) else None
    return None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def read_json_object(path: Path, what: str = "the file", strict: bool = True) -> dict:
    """A JSON file that must hold an object; anything else is a :class:`FormatError`.

    Never more than ``MAX_JSON_BYTES``, never a crash on deep nesting. ``strict`` (for the files
    deltamerge interprets: indexes, manifests) also refuses what Python's json lets through: NaN,
    duplicate keys, lone surrogates. Files only copied along (tokenizers) are not held to that.
    """
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise FormatError(f"{path}: not a regular file")
            if info.st_size > MAX_JSON_BYTES:
                raise FormatError(f"{path}: {info.st_size} bytes is too large for a JSON file")
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    known = describe_download(path, data[:64], what)
    if known:
        raise FormatError(known)
    try:
        if strict:
            obj = json.loads(
                data.decode("utf-8-sig"),
                object_pairs_hook=reject_duplicates,
                parse_constant=_reject_constant,
            )
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        else:
            obj = _loads_lenient(data)
    except (UnicodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


@contextmanager
def json_parsed_once() -> Iterator[None]:
    """Within it (a run being planned), the same JSON bytes are parsed once, whoever reads them.

    A tokenizer.json is read by the base's and the delta's side-file checks (the delta usually
    ships the same file), then by the GGUF plan: Falcon's 4.6 MB took 0.1 s each time, Llama 3's
    17 MB far more. Keyed by the bytes themselves, so two files share a parse only when they are
    equal. Nested, it keeps the outer cache; the parsed values are dropped when the outermost
    ends (before the engine runs: a parsed tokenizer takes several times its file's size).
    """
    if _PARSED.get() is not None:
        yield
        return
    token = _PARSED.set({})
    try:
        yield
    finally:
        _PARSED.reset(token)


def loads_utf8(data: bytes) -> Any:
    """``json.loads(data.decode("utf-8"))``, raising what that raises; within
    :func:`json_parsed_once`, bytes parsed already are not parsed again (callers must not change
    what it returns)."""
    parsed = _PARSED.get()
    if parsed is not None and data in parsed:
        return parsed[data]
    obj = json.loads(data.decode("utf-8"))
    if parsed is not None:
        parsed[data] = obj
    return obj


def _loads_lenient(data: bytes) -> Any:
    """``json.loads(data)``, through :func:`loads_utf8` where the two are the same parse: bytes
    with no BOM and no NUL in their first four (``json.detect_encoding`` then says UTF-8) that
    decode as strict UTF-8 (``json.loads`` decodes with ``surrogatepass``, which differs only on
    bytes strict UTF-8 refuses: only that decode raises ``UnicodeDecodeError`` in ``loads_utf8``)."""
    if not data.startswith(codecs.BOM_UTF8) and b"\x00" not in data[:4]:
        try:
            return loads_utf8(data)
        except UnicodeDecodeError:
            pass
    return json.loads(data)
