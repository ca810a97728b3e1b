"""Where results go: a temporary folder beside OUT, renamed into place only when complete.

OUT is either absent or finished: a run that fails or is interrupted leaves nothing at OUT.
The temporary folder has a fixed name derived from OUT so that a later run can find it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import InputError, OutputExistsError
from .plan import Shard


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.deltamerge-partial"


def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless ``force``: overwriting a model by accident costs hours."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: exists and is not empty (use --force to replace it)")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: no such folder to write {out.name} into")


def make_partial(out: Path) -> Path:
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder to OUT, replacing what ``force`` allowed to be replaced."""
    _fsync_dir(tmp)
    if out.exists():
        trash = out.parent / f".{out.name}.deltamerge-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_index(tmp: Path, shards: list[Shard], prefix: str = "model") -> None:
    """The ``model.safetensors.index.json`` transformers expects when there is more than one shard."""
    if len(shards) < 2:
        return
    weight_map = {job.name: shard.filename for shard in shards for job in shard.jobs}
    index = {
        "metadata": {
            "total_size": sum(job.out.nbytes for shard in shards for job in shard.jobs),
            "total_parameters": sum(job.out.numel for shard in shards for job in shard.jobs),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(tmp / f"{prefix}.safetensors.index.json", index)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def copy_aux(tmp: Path, files: dict[str, Path | bytes]) -> None:
    for name, src in files.items():
        if isinstance(src, bytes):
            (tmp / name).write_bytes(src)
        else:
            shutil.copyfile(src, tmp / name)


def fix_config(tmp: Path, vocab_rows: int | None, dtype: str | None) -> None:
    """config.json must describe the result as written, not its inputs: ``vocab_size`` its
    embedding rows (or loading fails), its dtype (or ``from_pretrained(dtype="auto")`` loads it in
    another one), and no ``_name_or_path``, which names a folder on the machine that made an input.
    """
    path = tmp / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return
    if not isinstance(config, dict):
        return
    fixed = dict(config)
    fixed.pop("_name_or_path", None)
    if vocab_rows is not None:
        fixed["vocab_size"] = vocab_rows
    if dtype is not None:
        # transformers 5 writes "dtype", earlier releases "torch_dtype"; both read the latter.
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            fixed[key] = dtype
    if fixed != config:
        write_json(path, fixed)
