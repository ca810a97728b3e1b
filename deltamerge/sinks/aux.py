"""The files of a result that are not weights: copied from the inputs, with config.json kept true.

Which files travel (``AUX_FILES``) and where each comes from (the last delta that has it, else
the base) is decided by the entry points; here they are written into the partial folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .folder import write_json


def copy_aux(tmp: Path, files: dict[str, Path | bytes]) -> None:
    for name, src in files.items():
        if isinstance(src, bytes):
            (tmp / name).write_bytes(src)
        else:
            shutil.copyfile(src, tmp / name)


def aux_bytes(files: dict[str, Path | bytes]) -> int:
    """The disk space ``copy_aux`` will take: a tokenizer (tens of MB for some models) counts
    toward the free-space check as the weights do."""
    return sum(len(src) if isinstance(src, bytes) else src.stat().st_size for src in files.values())


def fix_config(
    tmp: Path, vocab_rows: int | None, dtype: str | None, updates: dict | None = None
) -> None:
    """config.json must describe the result as written, not its inputs (see :func:`fixed_config`);
    it is rewritten only when that changes it."""
    path = tmp / "config.json"
    if not path.is_file():
        return
    config = load_config(path)
    if config is None:
        return
    fixed = fixed_config(config, vocab_rows, dtype, updates)
    if fixed != config:
        write_json(path, fixed)


def load_config(src: Path | bytes | None) -> dict | None:
    """A config.json's object; None when there is none, or it is not a JSON object."""
    if src is None:
        return None
    try:
        config = json.loads(src if isinstance(src, bytes) else src.read_text())
    except (ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def fixed_config(
    config: dict, vocab_rows: int | None, dtype: str | None, updates: dict | None = None
) -> dict:
    """``vocab_size`` the result's embedding rows (or loading fails), its dtype (or
    ``from_pretrained(dtype="auto")`` loads it in another one), no ``_name_or_path``, which
    names a folder on the machine that made an input, and the fields a delta's tensors need
    (``updates``: a prefix encoder's ``pre_seq_len``). ``auto_map`` (the model's own code, for
    ``trust_remote_code``) is kept as it is.
    """
    fixed = dict(config)
    fixed.pop("_name_or_path", None)
    if vocab_rows is not None:
        fixed["vocab_size"] = vocab_rows
    if dtype is not None:
        # transformers 5 writes "dtype", earlier releases "torch_dtype"; both read the latter.
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            fixed[key] = dtype
    fixed.update(updates or {})
    return fixed
