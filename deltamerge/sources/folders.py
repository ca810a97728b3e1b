"""What a checkpoint folder holds: which weight format, which shard files, which other files.

Shard names come from index files that may be hostile, so every name is resolved inside the
folder and refused if it leaves it (``../``, absolute paths, symlinks pointing outside).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, InputError, NotFoundError
from .safetensors_format import describe_download, reject_duplicates, text_ok

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Index files, configs and manifests are kilobytes; a larger one is hostile or not JSON at all.
MAX_JSON_BYTES = 100_000_000
HUB_CACHE_PREFIXES = ("models--", "datasets--", "spaces--")

# Files that travel with a model and are not weights, copied into results and deltas.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass(frozen=True)
class Layout:
    """The weight files of a folder: ``format`` is "safetensors", "bin" or "meta"."""

    folder: Path
    format: str
    files: tuple[Path, ...]
    index: Path | None  # the index file whose weight_map names the shards, if any


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


def valid_name(name: object) -> bool:
    """A file name deltamerge will join to a folder: a non-empty UTF-8 string without NUL."""
    return isinstance(name, str) and bool(name) and "\x00" not in name and text_ok(name)


def leaves_folder(name: str) -> bool:
    """Whether the name alone (before any symlink) leads out: absolute, or through ``..``."""
    candidate = Path(name)
    return candidate.is_absolute() or ".." in candidate.parts


def _hub_blob(root: Path, target: Path) -> bool:
    """Whether ``target`` is a blob of the Hub cache repository whose snapshot holds ``root``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            repo = folder.parent.parent
            return repo.name.startswith(HUB_CACHE_PREFIXES) and target.parent == repo / "blobs"
    return False


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
            obj = json.loads(data)
    except (UnicodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: not valid JSON: {reason}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_weight_map(index: Path) -> dict[str, str]:
    obj = read_json_object(index, "the weights index")
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index}: weight_map must map tensor names to file names")
    if not weight_map:
        raise FormatError(f"{index}: weight_map is empty")
    return weight_map


def _sharded(folder: Path, index: Path, fmt: str) -> Layout:
    weight_map = read_weight_map(index)
    files: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        path = inside(folder, name, index)
        if not _is_file(path):
            raise FormatError(f"{index}: shard {name!r} is missing from {folder}")
        files.append(path)
    return Layout(folder, fmt, tuple(files), index)


def detect_layout(path: Path) -> Layout:
    """Choose the weight format of a folder (or a single weight file): safetensors first."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            return Layout(path.parent, "safetensors", (path,), None)
        if path.suffix in (".bin", ".pt", ".pth"):
            return Layout(path.parent, "bin", (path,), None)
        raise InputError(f"{path}: not a checkpoint folder or weight file")
    if (path / SAFETENSORS_INDEX).is_file():
        return _sharded(path, path / SAFETENSORS_INDEX, "safetensors")
    if (path / SAFETENSORS_SINGLE).is_file():
        return Layout(path, "safetensors", (path / SAFETENSORS_SINGLE,), None)
    if (path / BIN_INDEX).is_file():
        return _sharded(path, path / BIN_INDEX, "bin")
    if (path / BIN_SINGLE).is_file():
        return Layout(path, "bin", (path / BIN_SINGLE,), None)
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return Layout(path, "meta", tuple(sorted(path.glob("consolidated.*.pth"))), None)
    singles = sorted(p for p in path.glob("*.safetensors") if _is_file(p))
    if len(singles) == 1:
        return Layout(path, "safetensors", (singles[0],), None)
    raise InputError(
        f"{path}: no weights found (expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{BIN_INDEX}, {BIN_SINGLE} or Meta's params.json with consolidated.*.pth)"
    )


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False


def aux_files(folder: Path) -> dict[str, Path]:
    """The non-weight files present in ``folder``, by name.

    They are copied into results, so a JSON one that is not an object (an LFS pointer, a
    truncated download, a hostile config) is refused rather than passed on.
    """
    found = {name: folder / name for name in AUX_FILES if _is_file(folder / name)}
    for name, path in found.items():
        if name.endswith(".json"):
            obj = read_json_object(path, strict=False)
            if name == "config.json":
                _check_config(path, obj)
    return found


def _check_config(path: Path, config: dict) -> None:
    """The fields deltamerge reads or rewrites in config.json must have their types."""
    vocab = config.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool)):
        raise FormatError(f"{path}: vocab_size must be an integer, found {vocab!r}")
