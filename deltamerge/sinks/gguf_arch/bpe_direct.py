"""The tokenizer ``AutoTokenizer.from_pretrained`` makes of a BPE folder, built with ``tokenizers``
alone, for the folders where transformers provably builds it the same way.

Why: importing transformers (and torch, which it imports) costs seconds of a GGUF run, and
``get_vocab_base`` reads only the ``tokenizers.Tokenizer`` inside transformers' object: its vocabulary,
its added tokens and their flags, and what it encodes and decodes. For the folders admitted here,
transformers 5.25 (:data:`PROVEN_TRANSFORMERS`) makes that ``Tokenizer`` by these steps, which
:func:`load` repeats with the same library calls, in the same order and with the same arguments:

1. ``AutoTokenizer`` picks ``TokenizersBackend`` (which ``PreTrainedTokenizerFast`` names, and the
   Bloom classes map to) when tokenizer_config.json names one of :data:`CLASSES`, has no
   ``auto_map``, and config.json's ``model_type`` is one of :data:`MODEL_TYPES` (others, such as
   ``qwen2`` or ``mistral`` with mistral-common installed, swap in their own class, which
   rebuilds the pipeline: those folders go to ``AutoTokenizer``); it picks ``Qwen2Tokenizer``
   when tokenizer_config.json names one of :data:`QWEN2_CLASSES` and the model type is one of
   :data:`QWEN2_MODEL_TYPES` (step 5), and ``GPT2Tokenizer`` or ``GPTNeoXTokenizer`` when it names one
   of :data:`GPT2_CLASSES` or :data:`NEOX_CLASSES` and the model type is one of :data:`GPT2_MODEL_TYPES`
   (step 6). Of the config it reads nothing else but a ``model_name``
   (refused here) and the folder's path, whose special cases pick ``TokenizersBackend`` too.
2. ``TokenizersBackend.__init__`` reads tokenizer.json with ``Tokenizer.from_file``; since the
   file exists, tokenizer_config.json's ``add_bos_token``/``add_eos_token`` are dropped before it
   (``_from_pretrained``), so the post-processor is replaced only where tokenizer.json has none,
   by ``TemplateProcessing("$A:0", "$A:0 $B:1")`` (``update_post_processor`` with both flags off).
3. It then calls ``add_tokens`` with: every entry of tokenizer_config.json's ``added_tokens_decoder``
   by id (or, where it has none, of tokenizer.json's ``added_tokens``), then each named special
   token (bos, eos, unk, sep, pad, cls, mask; tokenizer_config.json's, or special_tokens_map.json's
   where there is no ``added_tokens_decoder``) and extra special token whose text is not among
   those, a plain string becoming ``AddedToken(text, special=True)`` and any token named as
   special getting ``special=True``. ``tokenizers`` keeps a token already added with the same
   flags and takes another's flags (or id: a vocabulary token becomes an added token), so this is
   where a tokenizer_config.json entry absent from tokenizer.json, or with other flags, counts.
4. ``encode`` is ``encode_batch([text])`` with ``encode_special_tokens`` set to the config's
   ``split_special_tokens``; ``decode`` is ``Tokenizer.decode(ids, skip_special_tokens=False)``:
   transformers 5 skips ``clean_up_tokenization_spaces`` for a BPE model (unless a key this gate
   refuses forces it).
5. ``Qwen2Tokenizer`` has its own ``__init__``, so ``convert_to_native_format`` does not hand it
   tokenizer.json: it passes the model's vocabulary and merges (as tuples), and the post-processor
   parsed from the file with an empty vocabulary, merges and added tokens. ``__init__`` builds a
   new ``Tokenizer``: ``BPE`` of those with its own settings, ``ByteLevel`` decoder, ``NFC``
   normalizer, ``Split`` on its regex then ``ByteLevel`` (the config's ``add_prefix_space``, else
   off) without regex; its named tokens default to ``<|endoftext|>`` (unk, eos, pad) where the
   config names none. Steps 2 and 3 follow on that ``Tokenizer`` (which holds no added tokens, so
   tokenizer.json's count only through step 3's list), the post-processor set first where the
   file's is not None; last, ``add_tokens`` of every special token's text (named, then extra, each
   once) as ``AddedToken(text, special=True)``. Other files of the folder (vocab.json,
   merges.txt) are not read.
6. ``GPT2Tokenizer`` and ``GPTNeoXTokenizer`` also have their own ``__init__``, fed as in step 5:
   ``BPE`` of the vocabulary and merges with their settings, ``ByteLevel`` decoder, ``ByteLevel``
   pre-tokenizer with the config's ``add_prefix_space`` (default off; GPT-NeoX's also with its
   ``trim_offsets`` and an ``NFC`` normalizer); named tokens default to ``<|endoftext|>`` (unk, bos,
   eos) and, for GPT-NeoX, pad ``<|padding|>``. Steps 2 and 3 follow as for step 5, without its
   last ``add_tokens``; GPT-NeoX's ``__init__`` ends with ``update_post_processor``, which with
   ``add_bos_token``/``add_eos_token`` dropped (step 2) sets the plain template whatever
   tokenizer.json's post-processor was. Of these three rebuilding classes a folder whose path
   matches one of transformers' ``MODEL_IDS_TO_TOKENIZERS_BACKEND`` patterns is refused (that path
   picks ``TokenizersBackend``).

Every tokenizer_config.json key is one of :data:`_CONFIG_KEYS`, whose effect is one of the steps
above or nothing on these members (chat templates, lengths, sides, names); tokenizer.json has no
truncation or padding (which would name a pad token) and a BPE model; special_tokens_map.json, where
it is read, names only the seven tokens; there is no added_tokens.json where it would be read. Any
other folder, or a folder whose files make any step raise, is read by ``AutoTokenizer`` as before,
so a folder transformers refuses is refused as transformers refuses it. The suite compares both
readers on every offline tokenizer and on variants of each admitted key (tests/gguf/test_bpe_direct.py).
"""

from __future__ import annotations

import fnmatch
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import gguf_kv

# transformers releases whose AutoTokenizer the steps above were read from and tested against.
PROVEN_TRANSFORMERS = ("5.25.",)
CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend", "BloomTokenizerFast", "BloomTokenizer"})
MODEL_TYPES = frozenset({"llama", "falcon", "gpt_neox", "bloom", "qwen3", "phi3", "gemma", "gemma2",
                         "gemma3_text"})
# Qwen2Tokenizer (step 5), for Qwen2, Qwen2.5 and Qwen3 models: the class, the model types it is
# shown to load with, its named-token defaults and its pre-tokenizer's regex.
QWEN2_CLASSES = frozenset({"Qwen2Tokenizer", "Qwen2TokenizerFast"})
QWEN2_MODEL_TYPES = frozenset({"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": None, "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                           r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GPT2Tokenizer and GPTNeoXTokenizer (step 6): the classes, the model types each is shown to load
# with (tests/gguf/test_bpe_direct.py's routing test), their named-token defaults.
GPT2_CLASSES = frozenset({"GPT2Tokenizer", "GPT2TokenizerFast"})
NEOX_CLASSES = frozenset({"GPTNeoXTokenizer", "GPTNeoXTokenizerFast"})
GPT2_MODEL_TYPES = frozenset({"llama", "gpt2", "gpt_neox", "starcoder2"})
GPT2_DEFAULTS = {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
NEOX_DEFAULTS = {**GPT2_DEFAULTS, "pad_token": "<|padding|>"}
# transformers' MODEL_IDS_TO_TOKENIZERS_BACKEND: a path matching one picks TokenizersBackend.
BACKEND_PATHS = ("deepseek-ai/deepseek-r1-distill-llama-*", "deepseek-ai/deepseek-coder-*",
                 "allenai/dolma2-tokenizer", "google/umt5-small", "naver-clova-ix/donut-*",
                 "salesforce/blip2-opt-*", "salesforce/blip2-flan-t5-*", "salesforce/instructblip-flan-t5-*",
                 "stepfun-ai/step-3.7-*")
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FIELDS = frozenset({"content", "single_word", "lstrip", "rstrip", "normalized", "special"})
_SIDES = ("right", "left")


def _one_of(values: Any) -> Any:
    return lambda v: isinstance(v, str) and v in values


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# tokenizer_config.json keys, each with the values admitted. Special tokens, added tokens, the
# class and split_special_tokens are steps 1, 3 and 4; add_bos/eos_token are dropped (step 2);
# the rest set attributes get_vocab_base does not read, or are overwritten by the loader.
_CONFIG_KEYS: dict[str, Any] = {
    "tokenizer_class": _one_of(CLASSES | QWEN2_CLASSES | GPT2_CLASSES | NEOX_CLASSES),
    "added_tokens_decoder": lambda v: isinstance(v, dict),
    **{name: (lambda v: v is None or isinstance(v, str)) for name in NAMED},
    "additional_special_tokens": _is_str_list,
    "extra_special_tokens": _is_str_list,
    "split_special_tokens": _is_bool,
    "add_bos_token": _is_bool,
    "add_eos_token": _is_bool,
    "clean_up_tokenization_spaces": _is_bool,
    "add_prefix_space": lambda v: v is None or isinstance(v, bool),
    "model_max_length": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    "model_input_names": _is_str_list,
    "padding_side": _one_of(_SIDES),
    "truncation_side": _one_of(_SIDES),
    "chat_template": lambda v: isinstance(v, str),
    "backend": lambda v: v == "tokenizers",
    "is_local": _is_bool,
    "local_files_only": _is_bool,
    "name_or_path": lambda v: isinstance(v, str),
    "special_tokens_map_file": lambda v: v is None,
    "errors": lambda v: isinstance(v, str),
    "trim_offsets": _is_bool,
}


class DirectTokenizer:
    """What ``get_vocab_base`` reads of transformers' ``TokenizersBackend``, over the same
    ``tokenizers.Tokenizer``: each member is that class's, call for call."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @property
    def vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return self.backend.get_added_tokens_decoder()

    def get_added_vocab(self) -> dict[str, int]:
        return {k.content: v for v, k in sorted(self.added_tokens_decoder.items(), key=lambda item: item[0])}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        [encoding] = self.backend.encode_batch([text], add_special_tokens=add_special_tokens,
                                               is_pretokenized=False)
        return encoding.ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def load(folder: Path) -> DirectTokenizer | None:
    """The tokenizer ``AutoTokenizer.from_pretrained(folder)`` makes, without transformers; None
    where that is not shown to be so (the caller then asks ``AutoTokenizer``)."""
    try:
        import tokenizers
    except ImportError:
        return None
    if not _proven_transformers():
        return None
    files = _admitted_files(folder)
    if files is None:
        return None
    tokenizer_config, special_tokens_map, tokenizer_json = files
    try:
        return _build(tokenizers, folder, tokenizer_config, special_tokens_map, tokenizer_json)
    except Exception:  # noqa: BLE001 - whatever the files make fail, AutoTokenizer says it its own way
        return None


def _proven_transformers() -> bool:
    """transformers is installed (the converter needs it) at a release the steps were read from."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return False
    return version.startswith(PROVEN_TRANSFORMERS)


def _json(path: Path) -> Any:
    """The parsed file; None where it is missing or not JSON (AutoTokenizer then says why)."""
    try:
        return gguf_kv.load_json(path) if path.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _admitted_files(folder: Path) -> tuple[dict, dict | None, dict] | None:
    """(tokenizer_config.json, special_tokens_map.json where it is read, tokenizer.json), or None
    unless all pass the gate the module's docstring states."""
    config, tokenizer_config, tokenizer_json = (_json(folder / name) for name in (
        "config.json", "tokenizer_config.json", "tokenizer.json"))
    if not all(isinstance(obj, dict) for obj in (config, tokenizer_config, tokenizer_json)):
        return None
    if "tokenizer_class" not in tokenizer_config or "model_name" in config:  # else the model type picks
        return None
    tokenizer_class = tokenizer_config["tokenizer_class"]
    rebuilt_by_gpt2 = _one_of(GPT2_CLASSES | NEOX_CLASSES)(tokenizer_class)
    model_types = (QWEN2_MODEL_TYPES if _one_of(QWEN2_CLASSES)(tokenizer_class)
                   else GPT2_MODEL_TYPES if rebuilt_by_gpt2 else MODEL_TYPES)
    if not _one_of(model_types)(config.get("model_type")):
        return None
    if model_types is not MODEL_TYPES and any(fnmatch.fnmatch(str(folder).lower(), p) for p in BACKEND_PATHS):
        return None
    if model_types is GPT2_MODEL_TYPES and tokenizer_config.get("add_prefix_space", False) is None:
        return None  # their ByteLevel takes it as it is
    if not all(key in _CONFIG_KEYS and _CONFIG_KEYS[key](value) for key, value in tokenizer_config.items()):
        return None
    if "additional_special_tokens" in tokenizer_config and "extra_special_tokens" in tokenizer_config:
        return None
    model = tokenizer_json.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return None
    if tokenizer_json.get("truncation") is not None or tokenizer_json.get("padding") is not None:
        return None
    special_tokens_map = None
    if "added_tokens_decoder" not in tokenizer_config:
        if (folder / "added_tokens.json").exists():
            return None
        if (folder / "special_tokens_map.json").exists():
            special_tokens_map = _json(folder / "special_tokens_map.json")
            if not isinstance(special_tokens_map, dict) or not all(
                    key in NAMED and (isinstance(value, str) or (
                        isinstance(value, dict) and set(value) <= _ADDED_TOKEN_FIELDS))
                    for key, value in special_tokens_map.items()):
                return None
    return tokenizer_config, special_tokens_map, tokenizer_json


def _build(tokenizers: Any, folder: Path, tokenizer_config: dict, special_tokens_map: dict | None,
           tokenizer_json: dict) -> DirectTokenizer:
    """Steps 2 to 4 of the module's docstring: ``_from_pretrained``, then ``Qwen2Tokenizer.__init__``
    (step 5) where it is the class, and ``TokenizersBackend.__init__``."""
    added_token = tokenizers.AddedToken
    qwen2 = tokenizer_config["tokenizer_class"] in QWEN2_CLASSES
    gpt2 = tokenizer_config["tokenizer_class"] in GPT2_CLASSES
    neox = tokenizer_config["tokenizer_class"] in NEOX_CLASSES
    # _from_pretrained: the added tokens by id, the special tokens they name
    kwargs = dict(tokenizer_config)
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    decoder: dict[int, Any] = {}
    by_text: dict[str, Any] = {}
    if "added_tokens_decoder" in kwargs:
        for idx, token in kwargs["added_tokens_decoder"].items():
            token = added_token(**token)
            decoder[int(idx)] = token
            by_text[str(token)] = token
    else:
        for key, value in (special_tokens_map or {}).items():
            if isinstance(value, dict):
                value = added_token(**{k: v for k, v in value.items() if k != "special"}, special=True)
            kwargs[key] = value
        for serialized in tokenizer_json["added_tokens"]:
            serialized = dict(serialized)
            idx = serialized.pop("id")
            decoder[idx] = added_token(**serialized)
            by_text[str(decoder[idx])] = decoder[idx]
    for key in NAMED:
        if key in kwargs and by_text != {} and kwargs[key] is not None:
            kwargs[key] = by_text.get(str(kwargs[key]), kwargs[key])
    if qwen2:  # Qwen2Tokenizer's defaults, for the named tokens the config does not name
        kwargs = {**QWEN2_DEFAULTS, **kwargs}
    if gpt2 or neox:  # theirs (step 6)
        kwargs = {**(NEOX_DEFAULTS if neox else GPT2_DEFAULTS), **kwargs}
    named = {key: kwargs.get(key) for key in NAMED}
    extra = list(kwargs.get("extra_special_tokens") or [])

    # TokenizersBackend.__init__ (Qwen2Tokenizer's first rebuilds the pipeline, and the post-processor
    # comes from tokenizer.json through convert_to_native_format)
    if qwen2:
        backend, post_processor = _qwen2_backend(tokenizers, tokenizer_json, kwargs.get("add_prefix_space"))
        if post_processor:
            backend.post_processor = post_processor
    elif gpt2 or neox:
        backend, post_processor = _gpt2_backend(tokenizers, tokenizer_json, kwargs, neox)
        if post_processor:
            backend.post_processor = post_processor
    else:
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    split = bool(kwargs.get("split_special_tokens", False))
    backend.encode_special_tokens = split
    to_add = [token for _, token in sorted(decoder.items(), key=lambda x: x[0])]
    present = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items(), key=lambda x: x[0])]
    encoder = present + [str(token) for token in to_add]
    for value in named.values():
        if value is None:
            continue
        if str(value) not in encoder and value not in to_add:
            to_add.append(value)
    for token in extra:
        if str(token) not in encoder and token not in to_add:
            to_add.append(token)
    if to_add:
        named_texts = [str(t) for t in named.values() if t]
        tokens = []
        for token in to_add:
            if isinstance(token, str):
                token = added_token(token, special=True)
            elif isinstance(token, added_token) and not token.special and str(token) in named_texts:
                token.special = True
            tokens.append(token)
        backend.add_tokens(tokens)
    if backend.post_processor is None:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    if neox:  # GPTNeoXTokenizer.__init__'s last line: update_post_processor, both flags off
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    if qwen2:  # Qwen2Tokenizer.__init__'s last line: add_tokens of all_special_tokens
        texts = list(dict.fromkeys(str(t) for t in [*named.values(), *extra] if t is not None))
        backend.add_tokens([added_token(text, special=True) for text in texts])
    return DirectTokenizer(backend)


def _qwen2_backend(tokenizers: Any, tokenizer_json: dict, add_prefix_space: Any) -> tuple[Any, Any]:
    """Step 5: the ``Tokenizer`` ``Qwen2Tokenizer.__init__`` builds of the vocabulary and merges
    ``convert_to_native_format`` takes from tokenizer.json, and the post-processor it reads there
    (parsed with an empty vocabulary, merges and added tokens, as it does)."""
    vocab, merges, post_processor = _native(tokenizers, tokenizer_json)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab if vocab is not None else {"<|endoftext|>": 0}, merges=merges or [], dropout=None,
        unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
        byte_fallback=False))
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.normalizer = tokenizers.normalizers.NFC()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated",
                                        invert=False),
        tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=add_prefix_space if add_prefix_space is not None else False, use_regex=False)])
    return backend, post_processor


def _native(tokenizers: Any, tokenizer_json: dict) -> tuple[Any, Any, Any]:
    """What ``convert_to_native_format`` hands a class with its own ``__init__`` (steps 5 and 6):
    the model's vocabulary (a dict), merges (tuples, None where there are none) and the post-processor
    parsed with an empty vocabulary, merges and added tokens."""
    model = tokenizer_json["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {token[0] if isinstance(token, list) else token: i for i, token in enumerate(vocab)}
    merges = None
    if "merges" in model:
        merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
                  for merge in model["merges"]]
    minimal = {**tokenizer_json, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    return vocab, merges, tokenizers.Tokenizer.from_str(json.dumps(minimal)).post_processor


def _gpt2_backend(tokenizers: Any, tokenizer_json: dict, kwargs: dict, neox: bool) -> tuple[Any, Any]:
    """Step 6: the ``Tokenizer`` ``GPT2Tokenizer.__init__`` (or ``GPTNeoXTokenizer``'s, ``neox``) builds,
    with ``kwargs`` (the config's keys over the class's defaults), and tokenizer.json's post-processor."""
    vocab, merges, post_processor = _native(tokenizers, tokenizer_json)
    if vocab is None:
        vocab = {str(kwargs["unk_token"]): 0, str(kwargs["pad_token"]): 1} if neox else {}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
        fuse_unk=False))
    add_prefix_space = kwargs.get("add_prefix_space", False)
    if neox:
        backend.normalizer = tokenizers.normalizers.NFC()
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=add_prefix_space, trim_offsets=kwargs.get("trim_offsets", True))
    else:
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return backend, post_processor
