"""What deltamerge computes in place of the gguf package's slow paths equals what they give.

``gguf_pack`` packs a header's key/values into the bytes ``GGUFWriter`` writes, arrays whole, and
``bpe.pair_merges`` makes the merges ``SpecialVocab`` makes of a tokenizer.json. The architecture
tests compare whole files with the converter's, but only for what their tokenizers hold; here
every kind of array the writer takes (strings as str and as bytes, each number type, bools,
nested arrays, mixed ones it refuses) in both byte orders, and merges with spaces in them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from deltamerge.sinks.gguf_arch.bpe import pair_merges  # noqa: E402
from deltamerge.sinks.gguf_pack import kv_bytes  # noqa: E402

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
