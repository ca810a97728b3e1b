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


def fix_vocab_size(tmp: Path, vocab_rows: int | None) -> None:
    """``vocab_size`` in config.json must match the result's embedding rows, or loading fails."""
    path = tmp / "config.json"
    if vocab_rows is None or not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return
    if isinstance(config, dict) and config.get("vocab_size") != vocab_rows:
        config["vocab_size"] = vocab_rows
        write_json(path, config)
