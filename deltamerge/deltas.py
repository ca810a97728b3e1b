"""Which kind a delta folder is, and opening it as that kind.

The kind is read from the contents: a PEFT ``adapter_config.json`` is a LoRA adapter, a
``deltamerge.json`` names its kind, anything else is an additive delta. ``--kind`` overrides.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .kinds import Kind
from .manifest import MANIFEST_NAME, Manifest

KINDS = ("add", "xor", "xor-files", "lora")


def detect_kind(folder: Path, manifest: Manifest | None) -> str:
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if manifest is not None:
        return manifest.kind
    return "add"


def open_kind(kind: str, folder: Path) -> Kind:
    if kind == "add":
        from .kinds.add import AddKind

        return AddKind(folder)
    if kind == "xor":
        from .kinds.xor import XorKind

        return XorKind(folder)
    if kind == "lora":
        from .kinds.lora import LoraKind

        return LoraKind(folder)
    raise InputError(f"{folder}: unknown delta kind {kind!r} (choose from {', '.join(KINDS)})")


__all__ = ["KINDS", "MANIFEST_NAME", "detect_kind", "open_kind"]
