"""llama.cpp's ``convert_hf_to_gguf.py`` at the pinned release, run on a Hugging Face folder.

``scripts/test.sh`` fetches it (``scripts/fetch_llamacpp.sh``: the llama-cpp-python sdist's
vendored llama.cpp, cached in ``.cache/``) and names the folder in ``DELTAMERGE_LLAMACPP``. The
converter runs in a subprocess with its own gguf-py first on the path, as it runs for a user, so
the comparison is with the pinned converter and not with the gguf package deltamerge uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = "DELTAMERGE_LLAMACPP"


def llamacpp_dir() -> Path:
    """The extracted llama.cpp; a test without it skips, except in CI, where it fails."""
    value = os.environ.get(ENV)
    if not value:
        why = f"{ENV} is unset: run scripts/test.sh, or export {ENV}=$(scripts/fetch_llamacpp.sh)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    folder = Path(value)
    if not (folder / "convert_hf_to_gguf.py").is_file():
        pytest.fail(f"{ENV}={value} holds no convert_hf_to_gguf.py")
    return folder


def vocab_gguf(name: str) -> Path:
    """One of llama.cpp's ``models/ggml-vocab-NAME.gguf``: a real tokenizer, no weights."""
    return llamacpp_dir() / "models" / f"ggml-vocab-{name}.gguf"


def convert(folder: Path, out: Path, outtype: str) -> dict[str, bytes]:
    """The converter's GGUF file(s) for ``folder`` (file name -> bytes), written into ``out``."""
    root = llamacpp_dir()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(root / "convert_hf_to_gguf.py"), str(folder), "--outfile", f"{out}/",
         "--outtype", outtype], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.gguf"))}
