"""What a checkpoint folder holds: which weight format, which shard files, which other files.

Shard names come from index files that may be hostile, so every name is resolved inside the
folder with :func:`~deltamerge.formats.files.inside`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, InputError, NotFoundError
from ..formats.files import inside, read_json_object, stays_inside

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# A folder's weights are the first of these it holds: the order transformers' from_pretrained
# tries them in (modeling_utils._get_resolved_checkpoint_files, locally and on the Hub), so a
# folder that also holds another layout (a model.safetensors beside an index and its shards, a
# pytorch_model.bin beside safetensors) is read, checked and rebuilt as the weights users load.
WEIGHT_ORDER = (
    (SAFETENSORS_SINGLE, "safetensors"), (SAFETENSORS_INDEX, "safetensors"),
    (BIN_SINGLE, "bin"), (BIN_INDEX, "bin"),
)
INDEX_SUFFIX = ".index.json"
# Weight files by name, whatever their layout: what a whole-file delta must decode complete.
WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt")

# Files that travel with a model and are not weights, copied into results and deltas; with them
# the Python files of the folder's top level (CODE_SUFFIX), which models loaded with
# trust_remote_code=True (ChatGLM, MOSS, early Falcon, Aquila) name in config.json's auto_map.
CODE_SUFFIX = ".py"
# A lone weight file under another name: PandaGPT's pytorch_model.pt.
LONE_TORCH_SUFFIXES = (".pt", ".bin")
NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's pickled arguments, beside its checkpoints
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def is_aux_file(name: str) -> bool:
    """Whether a top-level file of an input travels into results and deltas."""
    return name in AUX_FILES or (name.endswith(CODE_SUFFIX) and "/" not in name)


def lone_torch_file(names: list[str]) -> str | None:
    """The one top-level ``.pt``/``.bin`` file among ``names`` (not the Trainer's), if only one."""
    found = [n for n in names if "/" not in n and n.endswith(LONE_TORCH_SUFFIXES)
             and n not in NOT_WEIGHTS]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Layout:
    """The weight files of a folder: ``format`` is "safetensors", "bin" or "meta"."""

    folder: Path
    format: str
    files: tuple[Path, ...]
    index: Path | None  # the index file whose weight_map names the shards, if any


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
    """Choose the weight files of a folder (or a single weight file): those transformers loads
    (``WEIGHT_ORDER``), else Meta's layout, a lone ``*.safetensors`` or ``.pt`` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            return Layout(path.parent, "safetensors", (path,), None)
        if path.suffix in (".bin", ".pt", ".pth"):
            return Layout(path.parent, "bin", (path,), None)
        raise InputError(f"{path}: not a checkpoint folder or weight file")
    for name, fmt in WEIGHT_ORDER:
        if (path / name).is_file():
            if name.endswith(INDEX_SUFFIX):
                return _sharded(path, path / name, fmt)
            return Layout(path, fmt, (path / name,), None)
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return Layout(path, "meta", tuple(sorted(path.glob("consolidated.*.pth"))), None)
    singles = sorted(p for p in path.glob("*.safetensors") if _is_file(p))
    if len(singles) == 1:
        return Layout(path, "safetensors", (singles[0],), None)
    lone = lone_torch_file(sorted(p.name for p in path.iterdir() if _is_file(p)))
    if lone is not None:
        return Layout(path, "bin", (path / lone,), None)
    raise InputError(
        f"{path}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{BIN_SINGLE}, {BIN_INDEX}, one .pt file or Meta's params.json with consolidated.*.pth)"
    )


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False


def aux_files(folder: Path) -> dict[str, Path]:
    """The non-weight files present in ``folder``, by name.

    They are copied into results, so one that is a symlink leading out of the folder is refused
    (see :func:`own_file`), and a JSON one that is not an object (an LFS pointer, a truncated
    download, a hostile config) is refused rather than passed on. FIFOs and devices are skipped.
    """
    found = {name: own_file(folder, folder / name) for name in AUX_FILES if _is_file(folder / name)}
    found.update(code_files(folder))
    for name, path in found.items():
        if name.endswith(".json"):
            obj = read_json_object(path, strict=False)
            if name == "config.json":
                _check_config(path, obj)
    return found


def own_file(folder: Path, path: Path) -> Path:
    """``path``, refused when a symlink leads it out of ``folder`` (into the Hub cache's blobs of
    the same repository is allowed: that is how a snapshot holds its files).

    For files whose bytes are copied into a result: weight files are parsed, never copied.
    """
    if not stays_inside(folder, path):
        raise FormatError(
            f"{path}: a symlink leading outside {folder} (to {_target(path)}): files copied "
            "into the result must be the folder's own; copy the file in instead of linking it"
        )
    return path


def _target(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):
        return "a path that cannot be resolved"


def _check_config(path: Path, config: dict) -> None:
    """The fields deltamerge reads or rewrites in config.json must have their types."""
    vocab = config.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool)):
        raise FormatError(f"{path}: vocab_size must be an integer, found {vocab!r}")


def code_files(folder: Path) -> dict[str, Path]:
    """The folder's top-level ``*.py`` files (a model's own code), by name.

    They are run by whoever loads the result, so each must be the folder's own: a symlink that
    leads out of it is refused (the Hub cache's links into its blobs are the folder's own).
    """
    found = {}
    for path in sorted(folder.glob(f"*{CODE_SUFFIX}")):
        if not _is_file(path):
            continue  # a folder, a device, a FIFO: not code, skipped as other odd files are
        found[path.name] = inside(folder, path.name, path)
    return found


def is_weight_name(name: str) -> bool:
    """A weight file, or a weight index, by its name alone."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)
