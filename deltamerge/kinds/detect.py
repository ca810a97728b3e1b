"""Which kind a delta folder is, and opening it as that kind.

The kind is read from the contents: a PEFT ``adapter_config.json`` is an adapter of the kind its
``peft_type`` names (LoRA, IA3, LoHa, LoKr, trainable tokens, VeRA, AdaLoRA, OFT, BOFT, HRA; any
other is refused by LoRA's opening), a
``deltamerge.json`` names its kind, and so do the marks make-delta writes into every weight
file's header (``marks.py``: they must agree with each other and with the manifest), ``*.enc``
files (OpenBuddy's encrypted releases) are ``enc``, weight files XORed whole (OpenAssistant
``xor_codec.py``) are ``xor-files``; otherwise the tensor names decide: LoRA factors without an
adapter config are a LoRA state dict (PandaGPT), tensors all of a ``prefix_encoder`` are a
P-tuning checkpoint (ChatGLM), anything else (a plain tensor delta without marks: FastChat's)
is an additive delta. ``--kind`` overrides, unless it contradicts the delta's own files
(``preflight.check_roles``). Each test, and each kind's opener, is registered in
``kind_registry.py``: this module runs them in their order.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..errors import DeltaMergeError, InputError
from ..integrity.manifest import MANIFEST_NAME, Manifest
from ..kind_registry import (
    DELTA_KINDS,
    FALLBACK,
    KINDS,
    NAMES,
    WHOLE_FILE_KINDS,
    Detector,
    detection_order,
)
from ..registry import load
from ..sources import open_checkpoint
from . import Kind
from .adapter import adapter_kind
from .lora import ADAPTER_CONFIG
from .marks import Marks, agreed_marks, check_manifest_marks, weight_headers


class _Probe:
    """What the detectors read of a delta folder, each thing read once: the tensor names are
    listed (headers, or a mapped pickle) only when a detector asks, and a folder that cannot be
    read has none (its opening says why)."""

    def __init__(self, folder: Path, manifest: Manifest | None):
        self.folder = folder
        self.manifest = manifest

    @cached_property
    def names(self) -> list[str] | None:
        try:
            with open_checkpoint(self.folder) as ckpt:
                return list(ckpt.specs)
        except DeltaMergeError:
            return None

    def run(self, kind: str | None, detector: Detector) -> str | None:
        """The kind ``detector`` finds (``kind``: the one that registers it), or None."""
        if detector.reads == "names":
            if self.names is None:
                return None
            found = load(detector.test)(self.names)
        elif detector.reads == "manifest":
            found = load(detector.test)(self.folder, self.manifest)
        else:
            found = load(detector.test)(self.folder)
        if found is True:
            return kind
        return None if found is False else found


def detect_kind(folder: Path, manifest: Manifest | None) -> str:
    """The first kind the detection order finds (``kind_registry.detection_order``), else the
    additive kind."""
    probe = _Probe(folder, manifest)
    for kind, detector in detection_order():
        found = probe.run(kind, detector)
        if found is not None:
            return found
    return FALLBACK


def adapter_config_kind(folder: Path) -> str | None:
    """A folder with a PEFT ``adapter_config.json`` is an adapter of the kind its peft_type
    names; the detection order's first test."""
    return adapter_kind(folder) if (folder / ADAPTER_CONFIG).is_file() else None


def declared_kind_name(folder: Path, manifest: Manifest | None) -> str | None:
    """The kind the manifest or the marks declare (:func:`declared_kind`), for the detection order."""
    return declared_kind(folder, manifest)[0]


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
    opening a checkpoint (which the tensor names' tests do, for an answer that is never one) nor
    reading the marks (a whole-file delta has none)."""
    probe = _Probe(folder, None)
    for kind, detector in detection_order():
        if detector.order >= NAMES:
            break
        if detector.reads == "manifest":
            continue
        found = probe.run(kind, detector)
        if found is not None:
            return found if found in WHOLE_FILE_KINDS else None
    return None


def open_kind(kind: str, folder: Path) -> Kind:
    """The delta at ``folder`` opened as ``kind``, by its registered opener."""
    entry = DELTA_KINDS.get(kind)
    if entry is None:
        raise InputError(f"{folder}: unknown delta kind {kind!r} (choose from {', '.join(KINDS)})")
    if entry.whole_file:
        raise InputError(f"{folder}: a {kind} delta is decoded whole, alone: it cannot be chained")
    return entry.kind_class()(folder)


__all__ = ["KINDS", "MANIFEST_NAME", "WHOLE_FILE_KINDS", "adapter_config_kind", "declared_kind",
           "declared_kind_name", "declared_marks", "detect_kind", "open_kind", "whole_file_kind"]
