"""Every delta kind, registered in one list: its name, how it is detected, and how it is opened.

A kind's code is one module under ``kinds/`` (its :class:`~deltamerge.kinds.Kind` and, when its
files can say what it is, a detector); its entry here is what makes it exist: ``apply --kind``
offers it, ``kinds/detect.py`` runs its detectors in the detection order and opens it by its
opener. Entries name that code as ``"module:attribute"`` and import it when a run needs it, so
``deltamerge --help`` lists the kinds without loading torch. docs/design.md, *Adding a delta
kind*, says what a new one implements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry, load

# The detection order (docs/design.md, *Every delta says what it is*): a detector's place in it.
ADAPTER_CONFIG = 10  # a PEFT adapter_config.json: the kind its peft_type names
DECLARED = 20  # the manifest's kind, and the marks make-delta writes into the weight files
FILES = 30  # files only one kind has: *.enc, then weight files XORed whole
NAMES = 50  # the tensor names: LoRA factors, then a P-tuning prefix
FALLBACK = "add"  # what no detector claims: a plain tensor delta (FastChat's, unmarked)

READS = ("folder", "manifest", "names")


@dataclass(frozen=True)
class Detector:
    """One test of the detection order, at ``order`` in it. ``test`` is ``"module:function"``,
    called, by what it ``reads``, as ``test(folder)``, ``test(folder, manifest)`` or
    ``test(tensor_names)``; it answers True (the kind that registers it), a kind's name (a test
    that tells kinds apart: the adapter config's ``peft_type``), or False/None (not its kind)."""

    order: int
    test: str
    reads: str = "folder"

    def __post_init__(self) -> None:
        if self.reads not in READS:
            raise ValueError(f"a detector reads one of {', '.join(READS)}, not {self.reads!r}")


@dataclass(frozen=True)
class KindEntry:
    """A delta kind. ``opener``: ``"module:Class"``, the :class:`~deltamerge.kinds.Kind` built
    from the delta's folder; a ``whole_file`` kind has none (its files are decoded whole, alone,
    by apply's whole-file path, never chained). ``peft_type``: the ``adapter_config.json`` type it
    merges. ``made``: ``make-delta --kind`` computes it; ``marked``: make-delta writes it into the
    weight files' marks (``kinds/marks.py``)."""

    name: str
    opener: str | None = None
    detectors: tuple[Detector, ...] = ()
    whole_file: bool = False
    peft_type: str | None = None
    made: bool = False
    marked: bool = False

    def __post_init__(self) -> None:
        if (self.opener is None) != self.whole_file:
            raise ValueError(f"delta kind {self.name!r}: an opener, or whole_file, not both")

    def kind_class(self) -> type:
        """The kind's :class:`~deltamerge.kinds.Kind` class (its module imported now)."""
        return load(self.opener)


def _kinds(module: str) -> str:
    return f"deltamerge.kinds.{module}"


# In the order ``apply --kind`` lists them.
DELTA_KINDS: Registry[KindEntry] = Registry("delta kind", [
    KindEntry("add", _kinds("add:AddKind"), made=True, marked=True),
    KindEntry("xor", _kinds("xor:XorKind"), made=True, marked=True),
    KindEntry("xor-zstd", _kinds("xor_zstd:XorZstdKind"), marked=True),
    KindEntry("xor-files", whole_file=True,
              detectors=(Detector(FILES + 1, _kinds("xor_files:looks_like_xor_files")),)),
    KindEntry("enc", whole_file=True, detectors=(Detector(FILES, _kinds("enc:looks_like_enc")),)),
    KindEntry("lora", _kinds("lora:LoraKind"), peft_type="LORA", made=True, marked=True,
              detectors=(Detector(NAMES, _kinds("lora:looks_like_lora_state"), "names"),)),
    KindEntry("ia3", _kinds("ia3:Ia3Kind"), peft_type="IA3"),
    KindEntry("loha", _kinds("loha:LohaKind"), peft_type="LOHA"),
    KindEntry("lokr", _kinds("lokr:LokrKind"), peft_type="LOKR"),
    KindEntry("trainable-tokens", _kinds("trainable_tokens:TrainableTokensKind"),
              peft_type="TRAINABLE_TOKENS"),
    KindEntry("vera", _kinds("vera:VeraKind"), peft_type="VERA"),
    KindEntry("prefix", _kinds("prefix:PrefixKind"),
              detectors=(Detector(NAMES + 1, _kinds("prefix:looks_like_prefix"), "names"),)),
    KindEntry("fourierft", _kinds("fourierft:FourierFTKind"), peft_type="FOURIERFT"),
    KindEntry("randlora", _kinds("randlora:RandLoraKind"), peft_type="RANDLORA"),
    KindEntry("miss", _kinds("miss:MissKind"), peft_type="MISS"),
    KindEntry("shira", _kinds("shira:ShiraKind"), peft_type="SHIRA"),
    KindEntry("c3a", _kinds("c3a:C3AKind"), peft_type="C3A"),
    KindEntry("adalora", _kinds("adalora:AdaloraKind"), peft_type="ADALORA"),
    KindEntry("oft", _kinds("oft:OftKind"), peft_type="OFT"),
    KindEntry("boft", _kinds("boft:BoftKind"), peft_type="BOFT"),
    KindEntry("hra", _kinds("hra:HraKind"), peft_type="HRA"),
])

# The tests that are no kind's own, which the kinds' entries' detectors join in order.
DETECTORS: tuple[Detector, ...] = (
    Detector(ADAPTER_CONFIG, _kinds("detect:adapter_config_kind")),
    Detector(DECLARED, _kinds("detect:declared_kind_name"), "manifest"),
)


def detection_order() -> list[tuple[str | None, Detector]]:
    """Every detector with the kind that registers it (None: no kind's own), in order."""
    found = [(None, d) for d in DETECTORS]
    found += [(entry.name, d) for entry in DELTA_KINDS for d in entry.detectors]
    orders = [d.order for _, d in found]
    if len(set(orders)) != len(orders):
        raise ValueError("two detectors share a place in the detection order")
    return sorted(found, key=lambda item: item[1].order)


KINDS = DELTA_KINDS.names
WHOLE_FILE_KINDS = tuple(e.name for e in DELTA_KINDS if e.whole_file)
MAKE_KINDS = tuple(e.name for e in DELTA_KINDS if e.made)
MARKED_KINDS = tuple(e.name for e in DELTA_KINDS if e.marked)
PEFT_KINDS = {e.peft_type: e.name for e in DELTA_KINDS if e.peft_type}
