"""The architectures GGUF output supports, one module each, behind one interface (:class:`Arch`).

Each module mirrors one of llama.cpp's converter classes (``conversion/*.py`` of the pinned
``convert_hf_to_gguf.py``): which GGUF architecture it writes, the tensors it drops, how a
tensor's rows change on the way (q/k head permutation, +1 on norms), the hyperparameter and
tokenizer key/values, and the tensors it generates from the config alone (``rope_freqs``).
:func:`plan_gguf` asks the architecture for all of that before any data, so a new architecture
is one module registered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UnsupportedError
from . import bloom, falcon, gemma, gptneox, llama, mixtral, phi3, qwen
from .base import Arch, Stacked

__all__ = ["Arch", "Stacked", "for_config", "supported"]


def _registry() -> dict[str, Arch]:
    archs: list[Arch] = [*llama.ARCHS, *mixtral.ARCHS, *qwen.ARCHS, *gemma.ARCHS, *phi3.ARCHS, *falcon.ARCHS,
                         *bloom.ARCHS, *gptneox.ARCHS]
    return {name: arch for arch in archs for name in arch.hf_architectures}


def supported() -> list[str]:
    return list(_registry())


def for_config(config: dict[str, Any], where: Path) -> Arch:
    """The module for config.json's first architecture, or a one-line refusal listing the supported."""
    arches = config.get("architectures")
    name = arches[0] if isinstance(arches, list) and arches else None
    arch = _registry().get(name) if isinstance(name, str) else None
    if arch is None:
        raise UnsupportedError(
            f"{where}: GGUF output supports {', '.join(supported())}; "
            f"not {name or 'a config without architectures'}")
    return arch
