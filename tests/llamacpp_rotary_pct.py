"""Run llama.cpp's converter with the hparams transformers 4 gave it: ``rotary_pct`` kept.

    python tests/llamacpp_rotary_pct.py .../convert_hf_to_gguf.py MODEL --outfile ... --outtype ...

The pinned converter reads GPT-NeoX's ``rotary_pct`` from ``AutoConfig(...).to_dict()``.
transformers 4 kept it there (``GPTNeoXConfig.rotary_pct``, config.json's value); transformers 5
moves it into ``rope_parameters`` and the converter dies on a KeyError. This wraps the converter's
``ModelBase.load_hparams`` so that, when config.json has a ``rotary_pct`` the loaded hparams lack,
the hparams get config.json's value, as transformers 4's did, and then runs the converter as its
own ``__main__``. Nothing else is touched: every other hparam is transformers 5's ``to_dict()``
and every line of the converter runs as it is; a config without ``rotary_pct`` (every other
architecture), or hparams that already have it, pass through unchanged. The value comes from the
file, not from transformers 5's ``rope_parameters`` that deltamerge reads, so the two readings
are independent.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    script = Path(sys.argv[1])
    sys.argv = sys.argv[1:]
    # the converter's folder and its gguf-py first, as when it runs as a script
    local_gguf = [] if "NO_LOCAL_GGUF" in os.environ else [str(script.parent / "gguf-py")]
    sys.path[:0] = [str(script.parent), *local_gguf]
    from conversion import ModelBase

    load_hparams = ModelBase.load_hparams

    def with_rotary_pct(dir_model: Path, is_mistral_format: bool) -> dict[str, Any]:
        hparams = load_hparams(dir_model, is_mistral_format)
        config = Path(dir_model) / "config.json"
        if not is_mistral_format and config.is_file():
            raw = json.loads(config.read_text(encoding="utf-8"))
            if "rotary_pct" in raw:
                hparams.setdefault("rotary_pct", raw["rotary_pct"])
        return hparams

    ModelBase.load_hparams = staticmethod(with_rotary_pct)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
