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
import tempfile
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


class Conversion:
    """The converter started on ``folder`` in the background (``with Conversion(...) as c:``): the
    test writes our GGUF of the same model while the converter's process runs on the other core,
    then asks for the converter's files with ``c.files()``; leaving the block stops a converter
    still running."""

    def __init__(self, folder: Path, out: Path, outtype: str, via: Path | None = None) -> None:
        """``via``: a script that runs the converter (its path the script's first argument)
        after patching it, such as ``llamacpp_rotary_pct.py``."""
        root = llamacpp_dir()
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.out = out
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: nothing reads it until the end
        self.proc = subprocess.Popen(
            [sys.executable, *([str(via)] if via else []), str(root / "convert_hf_to_gguf.py"), str(folder),
             "--outfile", f"{out}/",
             "--outtype", outtype], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stops a converter the test no longer waits for (it failed before asking for its files)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def files(self) -> dict[str, bytes]:
        """The converter's GGUF file(s) (file name -> bytes), once it has exited with 0."""
        code = self.proc.wait(timeout=300)
        self.log.seek(0)
        assert code == 0, self.log.read().decode(errors="replace")[-3000:]
        return {p.name: p.read_bytes() for p in sorted(self.out.glob("*.gguf"))}


def convert(folder: Path, out: Path, outtype: str) -> dict[str, bytes]:
    """The converter's GGUF file(s) for ``folder`` (file name -> bytes), written into ``out``."""
    with Conversion(folder, out, outtype) as conversion:
        return conversion.files()
