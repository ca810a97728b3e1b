"""A run parses a side file's JSON once, however many of its stages read it.

The base's and the delta's side files are checked when they are opened, and the GGUF plan reads
the tokenizer.json again: a 4.6 MB Falcon tokenizer took 0.1 s each time. Within a run's plan
(``json_parsed_once``) equal bytes share one parse, and the lenient reading of copied files
stays exactly ``json.loads`` of their bytes. The run itself: test_gguf_architectures.
"""

from __future__ import annotations

import codecs
import json
from contextlib import nullcontext
from pathlib import Path

import pytest

from deltamerge.errors import FormatError
from deltamerge.formats import files
from deltamerge.formats.files import json_parsed_once, loads_utf8, read_json_object


def test_equal_bytes_share_one_parse_within_the_plan_only():
    text = b'{"a": [1, 2, {"b": "c"}]}'
    assert loads_utf8(text) is not loads_utf8(text)
    with json_parsed_once():
        first = loads_utf8(text)
        assert loads_utf8(bytes(bytearray(text))) is first  # equal bytes, another object
        assert loads_utf8(text + b" ") is not first
        with json_parsed_once():  # nested: the outer cache is kept
            assert loads_utf8(text) is first
        assert loads_utf8(text) is first
    assert files._PARSED.get() is None
    assert loads_utf8(text) is not first


ODD_BYTES = [
    b'{"a": 1}',
    codecs.BOM_UTF8 + b'{"a": 1}',
    '{"a": "\u00e9"}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-16-le"),
    '{"a": 1}'.encode("utf-32"),
    b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, encoded: json.loads of bytes passes it
    b'{"a": "\xff"}',
    b'\x00{"a": 1}',
    b'{"a": NaN, "a": 2}',
    b'["not", "an object"]',
    b'{"a": ',
]


@pytest.mark.parametrize("data", ODD_BYTES)
def test_lenient_reading_is_json_loads_of_the_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    try:
        expected = json.loads(data)
    except ValueError:
        expected = None
    for parsing in (False, True):
        with json_parsed_once() if parsing else nullcontext():
            if isinstance(expected, dict):
                assert read_json_object(path, strict=False) == expected
            else:
                with pytest.raises(FormatError):
                    read_json_object(path, strict=False)
