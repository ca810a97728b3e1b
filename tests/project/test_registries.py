"""The kinds' and the formats' registries: every name they hold loads and is what it says, the
detection order is the documented one, and a kind or format is what its one entry makes it.

A registry names code as ``"module:attribute"`` strings (so that ``--help`` reads it without
torch): a stale string would only fail when a run reached it, so each is loaded here.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import llama_state, save_checkpoint
from safetensors.torch import save_file

from deltamerge import kind_registry, outputs
from deltamerge.errors import InputError
from deltamerge.kind_registry import DELTA_KINDS, Detector, KindEntry
from deltamerge.kinds import Kind, adapter, detect
from deltamerge.make import make_delta
from deltamerge.outputs import OUTPUT_FORMATS, FormatOptions, OutputFormat, output_format
from deltamerge.registry import Registry, load
from deltamerge.sinks import Sink

# docs/design.md, *Every delta says what it is*: (the kind that registers it, what it tests).
DOCUMENTED_ORDER = [
    (None, "deltamerge.kinds.detect:adapter_config_kind"),
    (None, "deltamerge.kinds.detect:declared_kind_name"),
    ("enc", "deltamerge.kinds.enc:looks_like_enc"),
    ("xor-files", "deltamerge.kinds.xor_files:looks_like_xor_files"),
    ("lora", "deltamerge.kinds.lora:looks_like_lora_state"),
    ("prefix", "deltamerge.kinds.prefix:looks_like_prefix"),
]


# -- the kinds ------------------------------------------------------------------------------------
def test_every_kind_opens_as_a_kind_of_its_own_name():
    for entry in DELTA_KINDS:
        if entry.whole_file:
            assert entry.opener is None
            continue
        cls = entry.kind_class()
        assert issubclass(cls, Kind) and cls.name == entry.name, entry


def test_every_detector_loads_and_the_order_is_the_documented_one():
    order = kind_registry.detection_order()
    assert [(kind, d.test) for kind, d in order] == DOCUMENTED_ORDER
    assert all(callable(load(d.test)) for _, d in order)
    assert [d.reads for _, d in order] == ["folder", "manifest", "folder", "folder", "names", "names"]


def test_the_lists_are_read_from_the_registry():
    assert kind_registry.KINDS == ("add", "xor", "xor-zstd", "xor-files", "enc", "lora", "ia3",
                                   "loha", "lokr", "trainable-tokens", "vera", "prefix", "fourierft",
                                   "randlora", "miss", "shira", "c3a", "adalora", "oft", "boft", "hra")
    assert kind_registry.WHOLE_FILE_KINDS == detect.WHOLE_FILE_KINDS == ("xor-files", "enc")
    assert kind_registry.MAKE_KINDS == ("add", "xor", "lora")
    assert kind_registry.MARKED_KINDS == ("add", "xor", "xor-zstd", "lora")
    assert adapter.PEFT_KINDS == {"LORA": "lora", "IA3": "ia3", "LOHA": "loha", "LOKR": "lokr",
                                  "TRAINABLE_TOKENS": "trainable-tokens", "VERA": "vera",
                                  "FOURIERFT": "fourierft", "RANDLORA": "randlora", "MISS": "miss",
                                  "SHIRA": "shira", "C3A": "c3a", "ADALORA": "adalora", "OFT": "oft",
                                  "BOFT": "boft", "HRA": "hra"}


def test_a_registry_refuses_what_would_be_ambiguous(monkeypatch):
    with pytest.raises(ValueError, match="two delta kinds are named 'add'"):
        Registry("delta kind", [KindEntry("add", "m:A"), KindEntry("add", "m:B")])
    with pytest.raises(ValueError, match="an opener, or whole_file"):
        KindEntry("both", "m:A", whole_file=True)
    with pytest.raises(ValueError, match="an opener, or whole_file"):
        KindEntry("neither")
    with pytest.raises(ValueError, match="reads one of folder, manifest, names"):
        Detector(40, "m:f", reads="header")
    clash = KindEntry("late", "m:A", detectors=(Detector(kind_registry.FILES, "m:f"),))
    monkeypatch.setattr(kind_registry, "DELTA_KINDS", Registry("delta kind", [*DELTA_KINDS, clash]))
    with pytest.raises(ValueError, match="share a place in the detection order"):
        kind_registry.detection_order()


def _tensors(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.zeros(2, 2) for n in names}, folder / "model.safetensors")
    return folder


def test_detection_takes_the_first_test_that_answers(tmp_path: Path):
    """Each folder would satisfy the tests after the one that decides it."""
    lora = ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]
    adapter_dir = _tensors(tmp_path / "adapter", lora)
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (adapter_dir / "key.enc").write_bytes(b"\0" * 16)
    assert detect.detect_kind(adapter_dir, None) == "ia3"
    assert detect.whole_file_kind(adapter_dir) is None

    enc = _tensors(tmp_path / "enc", lora)
    (enc / "key.enc").write_bytes(b"\0" * 16)
    xored = bytearray((enc / "model.safetensors").read_bytes())
    xored[8] = 0  # a safetensors file XORed whole: its header's "{" is gone
    (enc / "model.safetensors").write_bytes(bytes(xored))
    assert detect.detect_kind(enc, None) == "enc" == detect.whole_file_kind(enc)
    (enc / "key.enc").unlink()
    assert detect.detect_kind(enc, None) == "xor-files" == detect.whole_file_kind(enc)

    assert detect.detect_kind(_tensors(tmp_path / "lora", [*lora, "prefix_encoder.x"]), None) == "lora"
    assert detect.detect_kind(_tensors(tmp_path / "prefix", ["transformer.prefix_encoder.embedding.weight"]),
                              None) == "prefix"
    assert detect.detect_kind(_tensors(tmp_path / "plain", ["model.norm.weight"]), None) == "add"
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "model.safetensors").write_bytes(b"\1" * 16)
    assert detect.detect_kind(unreadable, None) == "add"  # its opening says why
    assert detect.whole_file_kind(tmp_path / "plain") is None


def test_marks_come_before_the_files_and_the_names(tmp_path: Path):
    """A marked XOR delta whose folder also holds a stray ``.enc`` file stays XOR; the whole-file
    answer, which reads no marks, is enc (as it always was)."""
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    delta = tmp_path / "delta"
    make_delta(base, target, delta, kind="xor")
    (delta / "deltamerge.json").unlink()  # the marks alone say it
    assert detect.detect_kind(delta, None) == "xor"
    (delta / "stray.enc").write_bytes(b"\0" * 16)
    assert detect.detect_kind(delta, None) == "xor"
    assert detect.whole_file_kind(delta) == "enc"


def test_open_kind_refuses_an_unknown_or_a_whole_file_kind(tmp_path: Path):
    with pytest.raises(InputError, match=r"unknown delta kind 'diff' \(choose from add, xor, "):
        detect.open_kind("diff", tmp_path)
    for kind in ("xor-files", "enc"):
        with pytest.raises(InputError, match=f"a {kind} delta is decoded whole, alone"):
            detect.open_kind(kind, tmp_path)


def test_a_new_kind_is_one_module_and_one_entry(tmp_path: Path, monkeypatch):
    """What docs/design.md, *Adding a delta kind*, says is enough: the kind is detected at its
    place in the order, opened by its opener, and refused nowhere else."""
    module = types.ModuleType("fake_kind")

    class FakeKind(Kind):
        name = "fake"

        def plan(self, specs, options):
            return specs, {}

    module.FakeKind = FakeKind
    module.looks_like_fake = lambda folder: (folder / "FAKE").is_file()
    monkeypatch.setitem(sys.modules, "fake_kind", module)
    entry = KindEntry("fake", "fake_kind:FakeKind",
                      detectors=(Detector(kind_registry.FILES + 5, "fake_kind:looks_like_fake"),))
    registry = Registry("delta kind", [*DELTA_KINDS, entry])
    monkeypatch.setattr(kind_registry, "DELTA_KINDS", registry)
    monkeypatch.setattr(detect, "DELTA_KINDS", registry)

    folder = _tensors(tmp_path / "fake", ["base_model.model.q.lora_A.weight",
                                          "base_model.model.q.lora_B.weight"])
    assert detect.detect_kind(folder, None) == "lora"
    (folder / "FAKE").write_text("")
    assert detect.detect_kind(folder, None) == "fake"  # before the names
    opened = detect.open_kind("fake", folder)
    assert isinstance(opened, FakeKind) and opened.folder == folder
    assert detect.whole_file_kind(folder) is None


# -- the formats ----------------------------------------------------------------------------------
def test_every_format_declares_what_apply_asks():
    assert OUTPUT_FORMATS.names == outputs.FORMATS == ("hf", "gguf", "meta")
    for fmt in OUTPUT_FORMATS:
        assert issubclass(fmt, OutputFormat) and callable(load(fmt.sink)), fmt
        assert fmt.summary and not fmt.summary.endswith(".")
    asks = {f.name: (f.shard_files, f.whole_files, f.holds_vocab) for f in OUTPUT_FORMATS}
    assert asks == {"hf": (True, True, False), "gguf": (False, False, True),
                    "meta": (False, False, False)}


def test_each_format_records_its_own_options():
    assert output_format("hf").options() == {"format": "hf"}
    assert output_format("hf", max_shard_size="2GB").plan_shard_bytes(5) == 2 * 10**9
    meta = output_format("meta", mp=2)
    assert meta.options() == {"format": "meta", "mp": 2} and meta.plan_shard_bytes(5) == 5
    assert output_format("meta").options()["mp"] == 1
    for fmt in OUTPUT_FORMATS:
        made = output_format(fmt.name) if fmt.name != "gguf" else None
        assert made is None or (made.name == fmt.name and made.options()["format"] == fmt.name)


def test_gguf_records_its_options_and_defaults_its_threads():
    pytest.importorskip("gguf")
    fmt = output_format("gguf", outtype="q8_0", max_shard_size="1GB")
    assert fmt.options() == {"format": "gguf", "outtype": "q8_0", "split_max_size": 10**9}
    assert fmt.threads >= 1 and fmt.plan_shard_bytes(5) == 5
    assert output_format("gguf", outtype="q4_k_m", threads=3).threads == 3


@pytest.mark.parametrize(("name", "given", "message"), [
    ("meta", {"outtype": "f16", "mp": 3}, "--outtype is GGUF's tensor type: it needs --format gguf"),
    ("hf", {"threads": 0, "mp": 2}, "--threads must be 1 or more, not 0"),
    ("gguf", {"mp": 2, "max_shard_size": "1GB"}, "--mp is the number of Meta model-parallel shards"),
    ("meta", {"max_shard_size": "1GB"}, "--max-shard-size does not apply to --format meta"),
    ("meta", {"mp": 3}, "--mp must be one of 1, 2, 4, 8, not 3"),
])
def test_each_option_is_checked_by_its_format_in_order(name, given, message):
    """Every format checks its own options, in the registry's order, before the chosen one
    checks its values: the first message is the one the checks always gave."""
    with pytest.raises(InputError, match=message):
        output_format(name, **given)


def test_a_new_format_is_one_module_and_one_entry(monkeypatch):
    """Registered, a format's options are checked whatever the format chosen, and it is chosen
    by its name; apply then asks it for its sink."""

    class PlainFormat(OutputFormat):
        name = "plain"
        summary = "the rows as they are"
        sink = "deltamerge.sinks.safetensors:sink_for"

        @classmethod
        def check_options(cls, chosen: str, given: FormatOptions) -> None:
            if chosen == cls.name and given.max_shard_size is not None:
                raise InputError("--max-shard-size does not apply to --format plain")

        @classmethod
        def configure(cls, given: FormatOptions) -> OutputFormat:
            return cls()

        def options(self) -> dict:
            return {"format": self.name}

    monkeypatch.setattr(outputs, "OUTPUT_FORMATS", Registry("output format", [*OUTPUT_FORMATS, PlainFormat]))
    fmt = output_format("plain")
    assert isinstance(fmt, PlainFormat) and fmt.options() == {"format": "plain"}
    with pytest.raises(InputError, match="does not apply to --format plain"):
        output_format("plain", max_shard_size="1GB")
    assert output_format("hf", max_shard_size="1GB").options() == {"format": "hf"}
    assert isinstance(fmt.open_sink([], {}, vocab_rows=None, dtype=None, out=Path("out"),
                                    folder=Path("partial")), Sink)
