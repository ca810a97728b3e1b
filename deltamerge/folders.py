"""What a checkpoint folder holds: which weight format, which shard files, which other files.

Shard names come from index files that may be hostile, so every name is resolved inside the
folder and refused if it leaves it (``../``, absolute paths, symlinks pointing outside).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError, InputError, NotFoundError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

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
    """``folder/name``, refused when the name or a symlink leads outside ``folder``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FormatError(f"{what}: invalid file name {name!r}")
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise FormatError(f"{what}: file name {name!r} leaves the folder")
    path = folder / candidate
    root = folder.resolve()
    if root not in path.resolve().parents:
        raise FormatError(f"{what}: file name {name!r} leads outside the folder (symlink?)")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is a :class:`FormatError`."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(0)
            if head.startswith(b"version https://git-lfs"):
                raise FormatError(f"{path}: a Git LFS pointer, not the file: run `git lfs pull`")
            obj = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_weight_map(index: Path) -> dict[str, str]:
    obj = read_json_object(index)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def _sharded(folder: Path, index: Path, fmt: str) -> Layout:
    weight_map = read_weight_map(index)
    files: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        path = inside(folder, name, index)
        if not path.is_file():
            raise FormatError(f"{index}: shard {name} is missing from {folder}")
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
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return Layout(path, "safetensors", (singles[0],), None)
    raise InputError(
        f"{path}: no weights found (expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"{BIN_INDEX}, {BIN_SINGLE} or Meta's params.json with consolidated.*.pth)"
    )


def aux_files(folder: Path) -> dict[str, Path]:
    """The non-weight files present in ``folder``, by name."""
    return {name: folder / name for name in AUX_FILES if (folder / name).is_file()}
