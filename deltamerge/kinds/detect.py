"""Which kind a delta folder is, and opening it as that kind.

The kind is read from the contents: a PEFT ``adapter_config.json`` is an adapter of the kind its
``peft_type`` names (LoRA, IA3, LoHa, LoKr, trainable tokens, VeRA; any other is refused by LoRA's opening), a
``deltamerge.json`` names its kind, and so do the marks make-delta writes into every weight
file's header (``marks.py``: they must agree with each other and with the manifest), ``*.enc``
files (OpenBuddy's encrypted releases) are ``enc``, weight files XORed whole (OpenAssistant
``xor_codec.py``) are ``xor-files``; otherwise the tensor names decide: LoRA factors without an
adapter config are a LoRA state dict (PandaGPT), tensors all of a ``prefix_encoder`` are a
P-tuning checkpoint (ChatGLM), anything else (a plain tensor delta without marks: FastChat's)
is an additive delta. ``--kind`` overrides, unless it contradicts the delta's own files
(``preflight.check_roles``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DeltaMergeError, InputError
from ..integrity.manifest import MANIFEST_NAME, Manifest
from ..names import KINDS
from ..sources import open_checkpoint
from . import Kind
from .adapter import adapter_kind
from .add import AddKind
from .enc import looks_like_enc
from .ia3 import Ia3Kind
from .loha import LohaKind
from .lokr import LokrKind
from .lora import LoraKind, looks_like_lora_state
from .marks import Marks, agreed_marks, check_manifest_marks, weight_headers
from .prefix import PrefixKind, looks_like_prefix
from .trainable_tokens import TrainableTokensKind
from .vera import VeraKind
from .xor import XorKind
from .xor_files import looks_like_xor_files
from .xor_zstd import XorZstdKind

WHOLE_FILE_KINDS = ("xor-files", "enc")  # decoded file by file, alone, not in the tensor stream
_ADAPTER_KINDS = {"ia3": Ia3Kind, "loha": LohaKind, "lokr": LokrKind,
                  "trainable-tokens": TrainableTokensKind, "vera": VeraKind}  # peft types besides LoRA


def detect_kind(folder: Path, manifest: Manifest | None) -> str:
    if (folder / "adapter_config.json").is_file():
        return adapter_kind(folder)
    said, _ = declared_kind(folder, manifest)
    if said is not None:
        return said
    if looks_like_enc(folder):
        return "enc"
    if looks_like_xor_files(folder):
        return "xor-files"
    return _kind_of_names(folder)


def declared_kind(folder: Path, manifest: Manifest | None) -> tuple[str | None, str]:
    """The kind a delta's manifest or its weight files' marks declare, and which says so (for
    messages); None when neither does. Marks that contradict the manifest are refused."""
    if manifest is not None and manifest.kind in WHOLE_FILE_KINDS:
        return manifest.kind, MANIFEST_NAME  # its weight files are XORed bytes: no marks
    marks = declared_marks(folder, manifest)
    if manifest is not None:
        return manifest.kind, MANIFEST_NAME
    if marks is not None:
        return marks.kind, marks.said_by
    return None, MANIFEST_NAME


def declared_marks(folder: Path, manifest: Manifest | None) -> Marks | None:
    """The marks of a delta's weight files, refused when they disagree with each other or with
    its manifest; None when none are marked, or the weights cannot be read yet (a Hub snapshot
    before its download; the opening says why otherwise)."""
    headers = weight_headers(folder)
    if headers is None:
        return None
    marks = agreed_marks(headers)
    if manifest is not None:
        check_manifest_marks(folder, marks, manifest.kind, manifest.delta_id, MANIFEST_NAME)
    return marks


def whole_file_kind(folder: Path) -> str | None:
    """The whole-file kind ``detect_kind`` would find without a manifest, if any, found without
    opening a checkpoint (which ``_kind_of_names`` does, for an answer that is never one)."""
    if (folder / "adapter_config.json").is_file():
        return None
    if looks_like_enc(folder):
        return "enc"
    if looks_like_xor_files(folder):
        return "xor-files"
    return None


def _kind_of_names(folder: Path) -> str:
    """"lora", "prefix" or "add", from the tensor names alone (headers, or a mapped pickle).

    A folder that cannot be read here is left to the additive kind, whose opening says why.
    """
    try:
        with open_checkpoint(folder) as ckpt:
            names = list(ckpt.specs)
    except DeltaMergeError:
        return "add"
    if looks_like_lora_state(names):
        return "lora"
    if looks_like_prefix(names):
        return "prefix"
    return "add"


def open_kind(kind: str, folder: Path) -> Kind:
    if kind == "add":
        return AddKind(folder)
    if kind == "xor":
        return XorKind(folder)
    if kind == "xor-zstd":
        return XorZstdKind(folder)
    if kind == "lora":
        return LoraKind(folder)
    if kind in _ADAPTER_KINDS:
        return _ADAPTER_KINDS[kind](folder)
    if kind == "prefix":
        return PrefixKind(folder)
    if kind in WHOLE_FILE_KINDS:
        raise InputError(f"{folder}: a {kind} delta is decoded whole, alone: it cannot be chained")
    raise InputError(f"{folder}: unknown delta kind {kind!r} (choose from {', '.join(KINDS)})")


__all__ = ["KINDS", "MANIFEST_NAME", "WHOLE_FILE_KINDS", "declared_kind", "declared_marks",
           "detect_kind", "open_kind", "whole_file_kind"]
