"""GPT-2 style BPE tokenizers (Llama 3, Qwen, SmolLM...) as the converter writes them.

``TextModel._set_vocab_gpt2``: the tokens come from transformers' ``AutoTokenizer`` (which is
what the converter reads, so the same added-token normalisation applies), or, where that is shown
to be the same ``tokenizers.Tokenizer``, from :mod:`.bpe_direct` without importing transformers;
the pre-tokenizer is
named by the hash of how the tokenizer encodes a fixed text (:mod:`.bpe_pre`), and the merges
and special tokens come from the converter's own ``SpecialVocab`` (:mod:`..gguf_special`);
where tokenizer.json holds the merges as pairs, they are made here from the tokenizer.json the
plan parsed already, as ``SpecialVocab`` makes them, and it reads the rest without parsing the
file again (:func:`special_vocab`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from hashlib import sha256
from itertools import chain
from pathlib import Path
from typing import Any

from ...errors import FormatError, UnsupportedError
from .. import gguf_kv
from ..gguf_special import SpecialVocab
from . import bpe_direct
from .bpe_pre import CHECK_TEXT, PRE_TOKENIZERS

try:
    import gguf
except ImportError:
    gguf = None


def auto_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``, as the converter loads a BPE tokenizer."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UnsupportedError(
            f"{folder}/tokenizer.json: GGUF output of a BPE tokenizer needs transformers to read it: "
            "pip install 'deltamerge[gguf]'") from None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{folder}/tokenizer.json: transformers cannot load the tokenizer ({first})"
                          ) from None


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer the converter reads: :mod:`.bpe_direct`'s where it admits the folder."""
    return bpe_direct.load(folder) or auto_tokenizer(folder)


def check_hash(tokenizer: Any) -> str:
    """``get_vocab_base_pre``'s hash of how the tokenizer encodes its fixed text."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer(tokenizer: Any, folder: Path) -> str:
    """``get_vocab_base_pre``: the name llama.cpp gives the tokenizer's pre-tokenizer."""
    digest = check_hash(tokenizer)
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise UnsupportedError(f"{folder}/tokenizer.json: a BPE pre-tokenizer llama.cpp does not know "
                               f"(check hash {digest})")
    return name


def vocab(folder: Path, h: dict[str, Any]) -> tuple[list[str], list[int], str]:
    """``get_vocab_base``: tokens padded to ``vocab_size``, their types, the pre-tokenizer's name."""
    return listing(load_tokenizer(folder), folder, h, pre_tokenizer)


def listing(tokenizer: Any, folder: Path, h: dict[str, Any],
            pre: Callable[[Any, Path], str]) -> tuple[list[str], list[int], str]:
    """``get_vocab_base`` of a loaded tokenizer, its steps in its order; ``pre`` names the
    pre-tokenizer (the tests pass :func:`check_hash` to compare tokenizers llama.cpp does not name)."""
    tok_vocab = tokenizer.vocab
    vocab_size = h.get("vocab_size", len(tok_vocab))
    if max(tok_vocab.values()) >= vocab_size:
        raise FormatError(f"{folder}/tokenizer.json: token ids reach {max(tok_vocab.values())}, beyond the "
                          f"config's vocab_size {vocab_size}")
    tokpre = pre(tokenizer, folder)
    reverse = {i: token for token, i in tok_vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or gguf_kv.looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, tokpre


def add_gpt2_vocab(writer: Any, folder: Path, h: dict[str, Any]) -> None:
    """``_set_vocab_gpt2``."""
    if not (folder / "tokenizer.json").is_file():
        raise UnsupportedError(f"{folder}: GGUF output needs the tokenizer (tokenizer.json), found none")
    tokens, types, pre = vocab(folder, h)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab(folder, gguf_kv.load_json(folder / "tokenizer.json")).add_to_gguf(writer, quiet=True)


def special_vocab(folder: Path, tokenizer_json: dict[str, Any]) -> Any:
    """``SpecialVocab(folder, load_merges=True)``, without parsing the tokenizer.json again.

    Where its merges are pairs (:func:`pair_merges`), ``SpecialVocab`` is given them and reads,
    with ``load_merges=False``, a view of the folder (links to its files) whose tokenizer.json is
    the parsed one less the model's vocabulary and merges, which it then does not read: a few
    KB instead of Qwen2's 11 MB.
    """
    merges = pair_merges(tokenizer_json)
    if merges is None:
        return SpecialVocab(folder, load_merges=True)
    model = {key: value for key, value in tokenizer_json["model"].items() if key not in ("vocab", "merges")}
    with tempfile.TemporaryDirectory(prefix="deltamerge-vocab-") as scratch:
        view = Path(scratch)
        for entry in folder.iterdir():
            if entry.name != "tokenizer.json":
                (view / entry.name).symlink_to(entry.absolute())
        (view / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "model": model}), encoding="utf-8")
        special = SpecialVocab(view, load_merges=False)
    special.merges, special.load_merges = merges, True
    return special


def pair_merges(tokenizer_json: dict[str, Any]) -> list[str] | None:
    """The merges ``SpecialVocab(load_merges=True)`` makes of a tokenizer.json whose merges are
    pairs (transformers 4.45 and later write them so): ``"a b"``, a space within either encoded
    as U+0120. It converts them a character at a time, seconds for Qwen2's 151k; None for any
    other tokenizer.json, whose merges it reads itself (strings kept as they are, or merges.txt).
    """
    model = tokenizer_json.get("model")
    merges = model.get("merges") if isinstance(model, dict) else None
    if not isinstance(merges, list) or not merges or set(map(type, merges)) != {list} \
            or set(map(len, merges)) != {2} or set(map(type, chain.from_iterable(merges))) != {str}:
        return None
    return [f"{a.replace(' ', chr(288))} {b.replace(' ', chr(288))}" for a, b in merges]
