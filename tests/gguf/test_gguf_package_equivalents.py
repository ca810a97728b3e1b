"""What deltamerge computes in place of the gguf package's slow paths equals what they give.

``gguf_pack`` packs a header's key/values into the bytes ``GGUFWriter`` writes, arrays whole;
``bpe.pair_merges`` makes the merges ``SpecialVocab`` makes of a tokenizer.json, and
``bpe.special_vocab`` has ``SpecialVocab`` (``gguf_special``'s) read the rest without parsing
the file again. The architecture tests compare whole files with the converter's, but only for
what their tokenizers hold; here every kind of array the writer takes (strings as str and as
bytes, each number type, bools, nested arrays, mixed ones it refuses) in both byte orders,
merges with spaces in them, and the special tokens, templates and post-processors
``SpecialVocab`` reads besides.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from deltamerge.sinks.gguf_arch.bpe import pair_merges, special_vocab  # noqa: E402
from deltamerge.sinks.gguf_pack import kv_bytes  # noqa: E402
from deltamerge.sinks.gguf_special import SpecialVocab  # noqa: E402

V = gguf.GGUFValueType


def writer_with_every_kind(endianess: gguf.GGUFEndian) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(None, "llama", endianess=endianess)
    w.add_uint32("a.scalar", 7)
    w.add_string("a.string", "héllo")
    w.add_token_list(["<s>", "Ġhello", "\u2581wörld", "", "🦙", "[PAD5]"])
    w.add_array("a.bytes_tokens", [b"\x00\xff", bytearray(b"ab"), b""])
    w.add_token_types([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 4, 6])
    w.add_token_scores([0.0, -1000.0, 1.5, -3.25e-8])
    w.add_token_merges(["Ġ t", "h e", "a\u0120b c"])
    w.add_array("a.bools", [True, False, True])
    w.add_array("a.ints", [0, -1, 2**31 - 1, -(2**31)])
    w.add_array("a.nested", [[1, 2], [3]])
    w.add_array("a.one", ["x"])
    w.add_key_value("a.u64", [1, 2**64 - 1], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("a.i16", [-5, 5], V.ARRAY, sub_type=V.INT16)
    w.add_key_value("a.f64", [0.1, 1e300], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("a.tuple", (3, 4), V.ARRAY)
    w.add_chat_template("{{ messages }}")
    return w


def writers_own(w: gguf.GGUFWriter) -> bytes:
    buf = io.BytesIO()
    w.fout = [buf]
    w.state = gguf.gguf_writer.WriterState.HEADER
    w.write_kv_data_to_file()
    return buf.getvalue()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_kind_of_value_packs_to_the_writers_bytes(endianess: gguf.GGUFEndian):
    w = writer_with_every_kind(endianess)
    ours = kv_bytes(w, w.kv_data[0])
    assert ours == writers_own(w)
    assert b"\xf0\x9f\xa6\x99" in ours  # the emoji token, as UTF-8


@pytest.mark.parametrize("values", [["a", 1], [1, 2.0], [True, 1], ["a", None]], ids=str)
def test_arrays_the_writer_refuses_are_refused_in_its_words(values: list):
    w = gguf.GGUFWriter(None, "llama")
    w.add_array("a.mixed", values)
    with pytest.raises(ValueError) as ours:
        kv_bytes(w, w.kv_data[0])
    with pytest.raises(ValueError) as theirs:
        writers_own(w)
    assert str(ours.value) == str(theirs.value)


def special_vocab_merges(folder: Path, merges: list) -> list[str]:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "merges": merges}}))
    return gguf.SpecialVocab(folder, load_merges=True).merges


def test_pair_merges_are_special_vocabs(tmp_path: Path):
    merges = [["Ġ", "t"], ["a b", "c"], [" ", "  x "], ["é", "🦙"], ["\u0120", "\t"]]
    ours = pair_merges({"model": {"merges": merges}})
    assert ours == special_vocab_merges(tmp_path / "t", merges)
    assert ours[1] == "a\u0120b c"


@pytest.mark.parametrize("merges", [["a b", "c d"], [["a", "b"], ["c", "d", "e"]], [["a", "b"], "c d"], []],
                         ids=["strings", "a-triple", "mixed", "none"])
def test_other_merges_are_left_to_special_vocab(merges: list):
    assert pair_merges({"model": {"merges": merges}}) is None
    assert pair_merges({"model": {}}) is None


def bos_template(bos: str) -> dict:
    return {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                     {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}


@pytest.mark.parametrize("post_processor", [
    bos_template("<|begin|>"),
    {"type": "Sequence", "processors": [{"type": "ByteLevel", "trim_offsets": False},
                                        bos_template("<|begin|>")]},
    {"type": "RobertaProcessing", "sep": ["<|end|>", 2], "cls": ["<|begin|>", 1]},
    None,
], ids=["template", "bytelevel-then-template", "roberta", "none"])
def test_special_vocab_reads_what_it_reads_from_the_folder(tmp_path: Path, post_processor: dict | None):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    added = [{"id": i, "content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
              "single_word": False} for i, t in ((1, "<|begin|>"), (2, "<|end|>"), (3, "<|pad|>"))]
    tokenizer = {"version": "1.0", "added_tokens": added, "normalizer": {"type": "Lowercase"},
                 "post_processor": post_processor,
                 "model": {"type": "BPE", "vocab": {"a": 0, "b": 4, "a b": 5},
                           "merges": [["a", "b"], ["a ", "b"]]}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}, "pad_token": "<|pad|>",
         "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 2, "unk_token_id": 3}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")

    theirs = SpecialVocab(folder, load_merges=True)  # the converter's, reading the whole folder
    ours = special_vocab(folder, json.loads((folder / "tokenizer.json").read_text()))
    assert vars(ours) == vars(theirs)
    assert ours.merges == ["a b", "a\u0120 b"] and ours.special_token_ids["bos"] == 1
    assert [t["name"] for t in ours.chat_template] == ["default", "tools"]
