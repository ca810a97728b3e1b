"""``bpe_direct`` reads a BPE folder without transformers as ``AutoTokenizer`` reads it, or not at all.

The converter's ``get_vocab_base`` reads the tokenizer transformers builds; ``bpe_direct`` builds
the same ``tokenizers.Tokenizer`` itself for the folders its gate admits. Here both readers load
every tokenizer folder available offline (llama.cpp's vocabularies rebuilt by transformers, Meta's
Llama 3 shape on its vocabulary, Qwen2.5's and Qwen3's on Qwen2's) and a small BPE in a variant for
each tokenizer_config.json key and file the gate admits, as TokenizersBackend and as Qwen2Tokenizer,
GPT2Tokenizer and GPTNeoXTokenizer (which rebuild the pipeline), and must give the same tokens, token
types and pre-tokenizer hash, the same added tokens with the same flags, and the same encodings. The
folders it must not admit go to ``AutoTokenizer``, which a counter and a subprocess (is transformers
imported?) show; and a whole GGUF made through it is the converter's, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from llamacpp import llamacpp_dir

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gguf_models import cli, ours_and_converters, perturbed  # noqa: E402
from helpers import llama_config, llama_state, save_checkpoint  # noqa: E402

from deltamerge.sinks.gguf_arch import bpe, bpe_direct  # noqa: E402
from deltamerge.sinks.gguf_arch.bpe_pre import CHECK_TEXT  # noqa: E402

pytestmark = pytest.mark.skipif(not bpe_direct._proven_transformers(),
                                reason="bpe_direct is off for this transformers release (not yet proven)")

AddedToken = tokenizers.AddedToken
BOS, EOS, USER = "<|bos|>", "<|eos|>", "<|user|>"
# Added tokens of every kind get_vocab_base tells apart: special or not, normalized or not (then
# decoded from their encoding), looking special or not, U+2581 within, and one whose decoding
# clean_up_tokenization_spaces would change (transformers 5 does not clean up a BPE's).
ADDED = [
    AddedToken(BOS, special=True, normalized=False),
    AddedToken(EOS, special=True, normalized=False),
    AddedToken("<sp-normalized>", special=True, normalized=True),
    AddedToken(USER, special=False, normalized=False),
    AddedToken("hello  world", special=False, normalized=False),
    AddedToken("\u2581tab", special=False, normalized=True),
    AddedToken("a , b . it 's", special=False, normalized=False),
    AddedToken(" lead", special=False, normalized=False, lstrip=True),
]
TEXT = ("the quick brown fox jumps over the lazy dog; a , b . it 's hello  world <|bos|> <|user|> "
        "<|absent|> he said: don't, won't! 12345 \u2581tab")


@pytest.fixture(scope="module")
def small_bpe() -> dict[str, Any]:
    """A byte-level BPE of ~600 tokens with :data:`ADDED`, as tokenizer.json holds it."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CHECK_TEXT, TEXT] * 4, trainer)
    tok.add_tokens(ADDED)
    tokenizer_json = json.loads(tok.to_str())
    tokenizer_json["post_processor"] = template()
    return tokenizer_json


def template(bos: str | None = None) -> dict:
    """A ``TemplateProcessing``, as transformers writes it: ``[bos] A`` and ``[bos] A [bos] B``."""
    head = [{"SpecialToken": {"id": bos, "type_id": 0}}] if bos else []
    return {"type": "TemplateProcessing",
            "single": [*head, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [*head, {"Sequence": {"id": "A", "type_id": 0}}, *head,
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}} if bos else {}}


def meta_post_processor(bos: str, bos_id: int) -> dict:
    """Meta-Llama-3's: ``Sequence[ByteLevel, TemplateProcessing]`` adding its begin_of_text."""
    processing = template(bos)
    processing["special_tokens"][bos]["ids"] = [bos_id]
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return {"type": "Sequence", "processors": [byte_level, processing]}


def decoder_entries(tokenizer_json: dict) -> dict[str, dict]:
    """tokenizer.json's added tokens as transformers writes them in ``added_tokens_decoder``."""
    return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokenizer_json["added_tokens"]}


def write_folder(folder: Path, files: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        if content is not None:
            (folder / name).write_text(json.dumps(content), encoding="utf-8")
    return folder


def added_flags(tokenizer: Any) -> dict[int, tuple]:
    return {i: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)
            for i, t in tokenizer.added_tokens_decoder.items()}


def assert_same_reading(folder: Path, texts: tuple[str, ...] = (CHECK_TEXT, TEXT)) -> None:
    """Both readers: bpe_direct (which must admit the folder) and AutoTokenizer."""
    direct = bpe_direct.load(folder)
    assert direct is not None, f"{folder.name}: bpe_direct does not admit it"
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert type(auto) is loaded_class(config["tokenizer_class"])
    assert direct.vocab == auto.vocab
    assert added_flags(direct) == added_flags(auto)
    assert direct.get_added_vocab() == auto.get_added_vocab()
    for text in texts:
        for specials in (True, False):
            ids = auto.encode(text, add_special_tokens=specials)
            assert direct.encode(text, add_special_tokens=specials) == ids
            assert direct.decode(ids) == auto.decode(ids)
    h = {"vocab_size": max(auto.vocab.values()) + 3}  # padded, as a config's vocab_size may be
    digest = lambda tokenizer, _folder: bpe.check_hash(tokenizer)  # noqa: E731 - names no pre-tokenizer
    assert bpe.listing(direct, folder, h, digest) == bpe.listing(auto, folder, h, digest)


def loaded_class(tokenizer_class: str) -> type:
    """The class AutoTokenizer loads for an admitted tokenizer_config.json class."""
    for classes, cls in ((bpe_direct.QWEN2_CLASSES, transformers.Qwen2Tokenizer),
                         (bpe_direct.GPT2_CLASSES, transformers.GPT2Tokenizer),
                         (bpe_direct.NEOX_CLASSES, transformers.GPTNeoXTokenizer)):
        if tokenizer_class in classes:
            return cls
    return transformers.TokenizersBackend


# Each variant edits the files of a folder (None: no such file) from the small BPE's, which has a
# plain template, TokenizersBackend, bos and eos, and config.json's model_type llama.
Edit = Callable[[dict[str, Any]], None]


def vocab_token(files: dict[str, Any], rank: int = 300) -> str:
    """A token of the model's vocabulary, not an added one."""
    return next(t for t, i in files["tokenizer.json"]["model"]["vocab"].items() if i == rank)


def meta_llama3(files: dict[str, Any]) -> None:
    tj = files["tokenizer.json"]
    bos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == BOS)
    tj["post_processor"] = meta_post_processor(BOS, bos_id)
    files["tokenizer_config.json"] = {
        "added_tokens_decoder": decoder_entries(tj), "bos_token": BOS, "clean_up_tokenization_spaces": True,
        "eos_token": EOS, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{{ messages }}"}


def decoder_flags_differ(files: dict[str, Any]) -> None:
    entries = decoder_entries(files["tokenizer.json"])
    for entry in entries.values():
        if entry["content"] in (EOS, "hello  world"):
            entry["special"], entry["normalized"] = not entry["special"], not entry["normalized"]
        if entry["content"] == USER:
            entry["special"] = True
    files["tokenizer_config.json"]["added_tokens_decoder"] = entries


def decoder_extra_entries(files: dict[str, Any]) -> None:
    entries = decoder_entries(files["tokenizer.json"])
    plain = {"single_word": False, "lstrip": False, "rstrip": False}
    entries["9000"] = {"content": "<|new|>", "normalized": False, "special": True, **plain}
    entries["9001"] = {"content": "not there", "normalized": False, "special": False, **plain}
    entries["300"] = {"content": vocab_token(files), "normalized": False, "special": False, **plain}
    files["tokenizer_config.json"]["added_tokens_decoder"] = entries


def named_tokens(files: dict[str, Any]) -> None:
    files["tokenizer_config.json"].update({
        "bos_token": vocab_token(files), "eos_token": "<|absent|>", "pad_token": "<|pad|>", "unk_token": EOS,
        "cls_token": USER, "sep_token": None, "mask_token": vocab_token(files, 301)})


def legacy_special_tokens_map(files: dict[str, Any]) -> None:
    plain = {"single_word": False, "lstrip": False, "rstrip": False}
    files["special_tokens_map.json"] = {
        "bos_token": {"content": BOS, "normalized": True, **plain}, "eos_token": EOS,
        "pad_token": {"content": "<|pad|>", "normalized": False, "special": False, **plain},
        "mask_token": vocab_token(files), "cls_token": USER}


def falcon_shape(files: dict[str, Any]) -> None:
    """tiiuae/falcon-7b's files: PreTrainedTokenizerFast, special_tokens_map.json, auto_map."""
    files["tokenizer_config.json"] = {
        "add_prefix_space": False, "eos_token": EOS, "model_max_length": 2048,
        "name_or_path": "tiiuae/falcon_tokenizer", "special_tokens_map_file": None,
        "tokenizer_class": "PreTrainedTokenizerFast"}
    files["special_tokens_map.json"] = {"eos_token": EOS}
    files["config.json"] = {"model_type": "falcon", "auto_map": {
        "AutoConfig": "configuration_falcon.FalconConfig",
        "AutoModelForCausalLM": "modeling_falcon.FalconForCausalLM"}}


def bloom_shape(files: dict[str, Any]) -> None:
    files["tokenizer_config.json"] = {
        "add_prefix_space": False, "bos_token": BOS, "eos_token": EOS, "unk_token": "<unk>",
        "pad_token": "<pad>",
        "name_or_path": "bigscience/tokenizer", "special_tokens_map_file": None,
        "tokenizer_class": "BloomTokenizerFast", "padding_side": "left"}
    files["config.json"] = {"model_type": "bloom"}


def update(config: dict) -> Edit:
    return lambda files: files["tokenizer_config.json"].update(config)


def model_type(name: str) -> Edit:
    return lambda files: files.update({"config.json": {"model_type": name}})


def no_post_processor(files: dict[str, Any]) -> None:
    files["tokenizer.json"]["post_processor"] = None


def both(*edits: Edit) -> Edit:
    def edit(files: dict[str, Any]) -> None:
        for e in edits:
            e(files)
    return edit


VARIANTS: dict[str, Edit] = {
    "as-is": lambda files: None,
    "meta-llama3": meta_llama3,
    "pretrained-tokenizer-fast": update({"tokenizer_class": "PreTrainedTokenizerFast"}),
    "decoder-as-tokenizer-json": lambda files: files["tokenizer_config.json"].update(
        {"added_tokens_decoder": decoder_entries(files["tokenizer.json"])}),
    "decoder-empty": update({"added_tokens_decoder": {}, "pad_token": "<|pad|>"}),
    "decoder-flags-differ": decoder_flags_differ,
    "decoder-extra-entries": decoder_extra_entries,
    "named-tokens": named_tokens,
    "named-tokens-with-decoder": both(named_tokens, decoder_extra_entries),
    "add-bos-eos-token": update({"add_bos_token": True, "add_eos_token": True}),
    "no-post-processor": no_post_processor,
    "add-bos-token-no-post-processor": both(no_post_processor, update({"add_bos_token": True})),
    "meta-post-processor-no-config-decoder": both(
        meta_llama3, lambda files: files["tokenizer_config.json"].pop("added_tokens_decoder")),
    "legacy-special-tokens-map": legacy_special_tokens_map,
    "special-tokens-map-ignored-beside-decoder": both(
        legacy_special_tokens_map, lambda files: files["tokenizer_config.json"].update(
            {"added_tokens_decoder": decoder_entries(files["tokenizer.json"])})),
    "additional-special-tokens": lambda files: files["tokenizer_config.json"].update(
        {"additional_special_tokens": ["<|extra|>", BOS, USER, vocab_token(files)]}),
    "extra-special-tokens": lambda files: files["tokenizer_config.json"].update(
        {"extra_special_tokens": ["<|extra|>", EOS, vocab_token(files, 302)]}),
    "split-special-tokens": update({"split_special_tokens": True}),
    "clean-up-tokenization-spaces": update({"clean_up_tokenization_spaces": True}),
    "attributes": update({"padding_side": "left", "truncation_side": "left", "model_max_length": 64,
                          "model_input_names": ["input_ids"], "backend": "tokenizers", "is_local": False,
                          "local_files_only": True, "errors": "replace", "add_prefix_space": True,
                          "chat_template": "{{ x }}"}),
    "falcon-shape": falcon_shape,
    "bloom-shape": bloom_shape,
    **{f"model-type-{t}": model_type(t) for t in sorted(bpe_direct.MODEL_TYPES)},
}


# The variants that apply to Qwen2Tokenizer's folders (the others set the class or the model type).
QWEN2_VARIANTS = [name for name in VARIANTS if name not in {
    "meta-llama3", "pretrained-tokenizer-fast", "meta-post-processor-no-config-decoder", "falcon-shape",
    "bloom-shape"} and not name.startswith("model-type-")]
QWEN2_VARIANTS += [f"model-type-{t}" for t in sorted(bpe_direct.QWEN2_MODEL_TYPES)]


# The variants that apply to GPT2Tokenizer's and GPTNeoXTokenizer's folders, and options of theirs.
GPT2_VARIANTS = [name for name in QWEN2_VARIANTS if not name.startswith("model-type-")]
GPT2_VARIANTS += [f"model-type-{t}" for t in sorted(bpe_direct.GPT2_MODEL_TYPES)]
GPT2_VARIANTS += ["add-prefix-space", "trim-offsets-off", "no-named-tokens", "null-named-tokens",
                  "bos-post-processor", "byte-level-post-processor"]
GPT2_OPTIONS: dict[str, Edit] = {
    "add-prefix-space": update({"add_prefix_space": True}),
    "trim-offsets-off": update({"trim_offsets": False, "add_prefix_space": True}),
    "no-named-tokens": lambda files: [files["tokenizer_config.json"].pop(k)
                                      for k in ("bos_token", "eos_token")],
    "null-named-tokens": update({"bos_token": None, "eos_token": None, "unk_token": None, "pad_token": None}),
    # tokenizer.json's post-processor: GPT2Tokenizer keeps it, GPTNeoXTokenizer's template replaces it
    "bos-post-processor": lambda files: files["tokenizer.json"].update({"post_processor": meta_post_processor(
        BOS, next(t["id"] for t in files["tokenizer.json"]["added_tokens"] if t["content"] == BOS))}),
    "byte-level-post-processor": lambda files: files["tokenizer.json"].update({"post_processor": {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}}),
}


def small_files(small_bpe: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer.json": json.loads(json.dumps(small_bpe)),
            "tokenizer_config.json": {"tokenizer_class": "TokenizersBackend", "bos_token": BOS,
                                      "eos_token": EOS},
            "config.json": {"model_type": "llama"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_small_bpe_variants_read_the_same(tmp_path: Path, small_bpe: dict[str, Any], variant: str):
    files = small_files(small_bpe)
    VARIANTS[variant](files)
    assert_same_reading(write_folder(tmp_path / variant, files))


@pytest.mark.parametrize("variant", QWEN2_VARIANTS)
def test_small_bpe_qwen2_variants_read_the_same(tmp_path: Path, small_bpe: dict[str, Any], variant: str):
    """The same variants under Qwen2Tokenizer, which rebuilds the pipeline from tokenizer.json's
    vocabulary and merges (a ByteLevel BPE, NFC, its own regex), and Qwen2TokenizerFast."""
    files = small_files(small_bpe)
    files["tokenizer_config.json"]["tokenizer_class"] = "Qwen2Tokenizer"
    files["config.json"] = {"model_type": "qwen2"}
    if variant.startswith("model-type-"):
        files["config.json"] = {"model_type": variant.removeprefix("model-type-")}
    else:
        VARIANTS[variant](files)
    assert_same_reading(write_folder(tmp_path / variant, files))
    files["tokenizer_config.json"]["tokenizer_class"] = "Qwen2TokenizerFast"
    assert_same_reading(write_folder(tmp_path / f"{variant}-fast", files))


@pytest.mark.parametrize("tokenizer_class", ["GPT2Tokenizer", "GPTNeoXTokenizer"])
@pytest.mark.parametrize("variant", GPT2_VARIANTS)
def test_small_bpe_gpt2_and_neox_variants_read_the_same(tmp_path: Path, small_bpe: dict[str, Any],
                                                        variant: str, tokenizer_class: str):
    """The same variants, and their options (add_prefix_space, trim_offsets, their default named
    tokens), under GPT2Tokenizer and GPTNeoXTokenizer (and their Fast names), which rebuild the
    pipeline from tokenizer.json's vocabulary and merges."""
    files = small_files(small_bpe)
    files["tokenizer_config.json"]["tokenizer_class"] = tokenizer_class
    files["config.json"] = {"model_type": "gpt_neox"}
    if variant.startswith("model-type-"):
        files["config.json"] = {"model_type": variant.removeprefix("model-type-")}
    else:
        (GPT2_OPTIONS.get(variant) or VARIANTS[variant])(files)
    texts = (CHECK_TEXT, TEXT, QWEN_TEXT)  # the last with decomposed and full-width letters (NFC)
    assert_same_reading(write_folder(tmp_path / variant, files), texts)
    files["tokenizer_config.json"]["tokenizer_class"] = f"{tokenizer_class}Fast"
    assert_same_reading(write_folder(tmp_path / f"{variant}-fast", files), texts)


def llamacpp_tokenizers() -> list[str]:
    folder = llamacpp_dir() / "tokenizers"
    return sorted(p.name for p in folder.iterdir() if (p / "tokenizer.json").is_file())


# The model type of each rebuilt vocabulary's own model (llama.cpp's ggml-vocab-NAME.gguf).
MODEL_TYPE = {"falcon": "falcon", "llama-bpe": "llama", "gpt-2": "gpt_neox", "qwen2": "qwen3"}


def llamacpp_folder(root: Path, name: str, tokenizer_class: str | None = None) -> Path:
    folder = root / name
    shutil.copytree(llamacpp_dir() / "tokenizers" / name, folder, ignore=shutil.ignore_patterns("done"))
    (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE.get(name, "llama")}))
    if tokenizer_class is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = tokenizer_class
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_every_offline_tokenizer_reads_the_same(tmp_path: Path):
    """llama.cpp's rebuilt vocabularies: those whose class the gate admits as they are (Qwen2Tokenizer's
    and GPT2Tokenizer's among them), any other as TokenizersBackend."""
    names = llamacpp_tokenizers()
    assert {"falcon", "llama-bpe", "gpt-2", "qwen2"} <= set(names)
    for name in names:
        folder = llamacpp_folder(tmp_path / "as-is", name)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        if config.get("tokenizer_class") not in (bpe_direct.CLASSES | bpe_direct.QWEN2_CLASSES
                                                 | bpe_direct.GPT2_CLASSES | bpe_direct.NEOX_CLASSES):
            assert bpe_direct.load(folder) is None
            folder = llamacpp_folder(tmp_path / "backend", name, "TokenizersBackend")
        assert_same_reading(folder)


def test_meta_llama3_shape_reads_the_same_and_is_llama_bpe(tmp_path: Path):
    """Meta-Llama-3's files on its 128k vocabulary: PreTrainedTokenizerFast, the 256 reserved tokens
    in tokenizer_config.json's added_tokens_decoder, begin_of_text added by the post-processor."""
    folder = llamacpp_folder(tmp_path, "llama-bpe")
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bos = "<|begin_of_text|>"
    tj["post_processor"] = meta_post_processor(bos, tj["model"]["vocab"].get(bos) or next(
        t["id"] for t in tj["added_tokens"] if t["content"] == bos))
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder_entries(tj), "bos_token": bos, "clean_up_tokenization_spaces": True,
        "eos_token": "<|end_of_text|>", "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert_same_reading(folder, texts=(CHECK_TEXT,))
    assert bpe.vocab(folder, {})[2] == "llama-bpe"


# Qwen3's added tokens: (text, special); Qwen2.5 has all but the last four.
QWEN3_ADDED = [*[(f"<|{name}|>", True) for name in (
    "endoftext", "im_start", "im_end", "object_ref_start", "object_ref_end", "box_start", "box_end",
    "quad_start", "quad_end", "vision_start", "vision_end", "vision_pad", "image_pad", "video_pad")],
    *[(t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")]]
QWEN_TEXT = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
             "<tool_call>{\"a\": 1}</tool_call><think>\n\nhmm</think> caf\u00e9 cafe\u0301 \uff21 2024 "
             "<|endoftext|><|fim_prefix|>x<|im_end|>")


@pytest.mark.parametrize("shape", ["qwen2.5", "qwen3", "qwen3-config-flags-differ"])
def test_qwen_shapes_read_the_same(tmp_path: Path, shape: str):
    """Qwen2.5's and Qwen3's files on the Qwen2 vocabulary: Qwen2Tokenizer, many added tokens special
    or not in tokenizer_config.json's added_tokens_decoder, bos_token null, pad_token <|endoftext|>,
    the extra special tokens list, errors, split_special_tokens, add_prefix_space, a chat template,
    vocab.json and merges.txt beside tokenizer.json; and one whose tokenizer_config.json flags differ
    from tokenizer.json's."""
    folder = llamacpp_folder(tmp_path, "qwen2")
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = QWEN3_ADDED[:-4] if shape == "qwen2.5" else QWEN3_ADDED
    plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    tj["added_tokens"] = [{"id": 151643 + i, "content": c, **plain, "special": s}
                          for i, (c, s) in enumerate(added)]
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    if shape == "qwen2.5":  # the slow files Qwen's repositories ship beside it, which are not read
        (folder / "vocab.json").write_text(json.dumps({"<|unread|>": 0}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
    decoder = decoder_entries(tj)
    if shape == "qwen3-config-flags-differ":
        for entry in decoder.values():
            if entry["content"] in ("<think>", "<|vision_pad|>"):
                entry["special"] = not entry["special"]
            if entry["content"] == "<|fim_pad|>":
                entry["normalized"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, s in added if s and c != "<|endoftext|>"],
        "bos_token": None, "chat_template": "{% for m in messages %}{{ m }}{% endfor %}",
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}))
    model_type = "qwen2" if shape == "qwen2.5" else "qwen3"
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert_same_reading(folder, texts=(CHECK_TEXT, QWEN_TEXT))
    assert bpe.vocab(folder, {})[2] == "qwen2"


GPT2_SHAPES = {
    # SmolLM's tokenizer_config.json (tests/gguf/test_gguf_special_tokens.py's), on a llama model
    "smollm": ("llama", {"add_prefix_space": False, "bos_token": "<|endoftext|>",
                         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                         "tokenizer_class": "GPT2Tokenizer"}),
    # EleutherAI Pythia's, on a gpt_neox model
    "pythia": ("gpt_neox", {"add_prefix_space": False, "bos_token": "<|endoftext|>",
                            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                            "tokenizer_class": "GPTNeoXTokenizer"}),
}


@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_smollm_and_pythia_shapes_read_the_same(tmp_path: Path, shape: str):
    """SmolLM's (GPT2Tokenizer) and Pythia's (GPTNeoXTokenizer, whose pad defaults to <|padding|>,
    absent here, and whose template replaces tokenizer.json's) configs on the GPT-2 vocabulary."""
    folder = llamacpp_folder(tmp_path, "gpt-2")
    model, config = GPT2_SHAPES[shape]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"model_type": model}))
    assert_same_reading(folder, texts=(CHECK_TEXT, TEXT, QWEN_TEXT))
    assert bpe.vocab(folder, {})[2] == "gpt-2"


@pytest.mark.parametrize("tokenizer_class", sorted(bpe_direct.GPT2_CLASSES | bpe_direct.NEOX_CLASSES))
def test_gpt2_and_neox_classes_and_model_types_load_their_class(tmp_path: Path, small_bpe: dict[str, Any],
                                                                tokenizer_class: str):
    """Step 1 for GPT2Tokenizer and GPTNeoXTokenizer: each admitted name with each admitted model type
    is that class; model types that swap in another class are refused."""
    for model_type in sorted(bpe_direct.GPT2_MODEL_TYPES | {"phi3", "qwen2", "mistral", "stablelm",
                                                            "gpt_bigcode"}):
        folder, loaded = routed(tmp_path, small_bpe, tokenizer_class, model_type)
        if model_type in bpe_direct.GPT2_MODEL_TYPES:
            assert loaded is loaded_class(tokenizer_class)
        else:
            assert loaded is not loaded_class(tokenizer_class) and bpe_direct.load(folder) is None


def test_a_backend_path_is_refused_for_rebuilding_classes(tmp_path: Path, small_bpe: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch):
    """A relative path matching one of transformers' TokenizersBackend patterns loads that class."""
    files = small_files(small_bpe)
    files["tokenizer_config.json"]["tokenizer_class"] = "GPT2Tokenizer"
    write_folder(tmp_path / "deepseek-ai" / "deepseek-coder-x", files)
    monkeypatch.chdir(tmp_path)
    folder = Path("deepseek-ai/deepseek-coder-x")
    assert type(transformers.AutoTokenizer.from_pretrained(folder)) is transformers.TokenizersBackend
    assert bpe_direct.load(folder) is None


@pytest.mark.parametrize("tokenizer_class", sorted(bpe_direct.QWEN2_CLASSES))
def test_qwen2_classes_and_model_types_load_qwen2_tokenizer(tmp_path: Path, small_bpe: dict[str, Any],
                                                           tokenizer_class: str):
    """Step 1 for Qwen2Tokenizer: each admitted name with each admitted model type is that class."""
    for model_type in sorted(bpe_direct.QWEN2_MODEL_TYPES):
        assert routed(tmp_path, small_bpe, tokenizer_class, model_type)[1] is transformers.Qwen2Tokenizer


@pytest.mark.parametrize("tokenizer_class", sorted(bpe_direct.CLASSES))
def test_admitted_classes_and_model_types_load_tokenizers_backend(tmp_path: Path, small_bpe: dict[str, Any],
                                                                  tokenizer_class: str):
    """Step 1 of bpe_direct: each admitted class with each admitted model type is TokenizersBackend
    itself, not a subclass with its own pipeline."""
    for model_type in sorted(bpe_direct.MODEL_TYPES):
        assert routed(tmp_path, small_bpe, tokenizer_class, model_type)[1] is transformers.TokenizersBackend


def routed(root: Path, small_bpe: dict[str, Any], tokenizer_class: str, model_type: str) -> tuple[Path, type]:
    """A folder of the small BPE named ``tokenizer_class`` in a ``model_type``, and the class
    AutoTokenizer loads for it."""
    files = small_files(small_bpe)
    files["tokenizer_config.json"]["tokenizer_class"] = tokenizer_class
    files["config.json"] = {"model_type": model_type}
    folder = write_folder(root / model_type, files)
    return folder, type(transformers.AutoTokenizer.from_pretrained(folder))


def reject(key: str, value: Any) -> Edit:
    return lambda files: files["tokenizer_config.json"].update({key: value})


REJECTED: dict[str, Edit] = {
    "gpt2-tokenizer-model-type-phi3": both(reject("tokenizer_class", "GPT2Tokenizer"), model_type("phi3")),
    "neox-tokenizer-model-type-falcon": both(reject("tokenizer_class", "GPTNeoXTokenizer"),
                                             model_type("falcon")),
    "gpt2-tokenizer-add-prefix-space-null": both(reject("tokenizer_class", "GPT2Tokenizer"),
                                                 reject("add_prefix_space", None)),
    "neox-tokenizer-trim-offsets-null": both(reject("tokenizer_class", "GPTNeoXTokenizer"),
                                             reject("trim_offsets", None)),
    "qwen2-tokenizer-model-type-llama": reject("tokenizer_class", "Qwen2Tokenizer"),
    "qwen2-tokenizer-model-type-qwen3-5": both(reject("tokenizer_class", "Qwen2Tokenizer"),
                                               model_type("qwen3_5")),
    "llama-tokenizer-fast": reject("tokenizer_class", "LlamaTokenizerFast"),
    "no-class": lambda files: files["tokenizer_config.json"].pop("tokenizer_class"),
    "no-tokenizer-config": lambda files: files.update({"tokenizer_config.json": None}),
    # qwen2 is among transformers' "incorrect hub class" model types: Qwen2Tokenizer is used
    "model-type-qwen2": lambda files: files.update({"config.json": {"model_type": "qwen2"}}),
    "model-type-mistral": lambda files: files.update({"config.json": {"model_type": "mistral"}}),
    "no-config": lambda files: files.update({"config.json": None}),
    "config-model-name": lambda files: files["config.json"].update({"model_name": "qwen2"}),
    "auto-map": reject("auto_map", {"AutoTokenizer": ["tok.Tok", None]}),
    "fast-tokenizer-files": reject("fast_tokenizer_files", ["tokenizer.json"]),
    "fix-mistral-regex": reject("fix_mistral_regex", True),
    "model-specific-token": reject("eot_token", "<|eot|>"),
    "bpe-clean-up-forced": reject(
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True),
    "unknown-key": reject("do_lower_case", True),
    "dict-special-token": reject("bos_token", {"__type": "AddedToken", "content": BOS}),
    "padding-side": reject("padding_side", "middle"),
    "both-extra-lists": lambda files: files["tokenizer_config.json"].update(
        {"additional_special_tokens": ["<|a|>"], "extra_special_tokens": ["<|b|>"]}),
    "truncation": lambda files: files["tokenizer.json"].update(
        {"truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}}),
    "padding": lambda files: files["tokenizer.json"].update({"padding": {
        "strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
        "pad_type_id": 0, "pad_token": EOS}}),
    "added-tokens-json": lambda files: files.update({"added_tokens.json": {"<|more|>": 9000}}),
    "special-tokens-map-extra-list": lambda files: files.update(
        {"special_tokens_map.json": {"additional_special_tokens": ["<|a|>"]}}),
}


@pytest.mark.parametrize("variant", list(REJECTED))
def test_the_gate_sends_other_folders_to_auto_tokenizer(tmp_path: Path, small_bpe: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch, variant: str):
    files = small_files(small_bpe)
    REJECTED[variant](files)
    folder = write_folder(tmp_path / variant, files)
    assert bpe_direct.load(folder) is None
    calls = []
    monkeypatch.setattr(bpe, "auto_tokenizer", lambda f: calls.append(f) or "auto")
    assert bpe.load_tokenizer(folder) == "auto" and calls == [folder]


def test_unproven_transformers_or_no_tokenizers_go_to_auto_tokenizer(
        tmp_path: Path, small_bpe: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    folder = write_folder(tmp_path / "small", small_files(small_bpe))
    assert bpe_direct.load(folder) is not None
    with monkeypatch.context() as m:
        m.setattr(bpe_direct.metadata, "version", lambda name: "5.26.0")
        assert bpe_direct.load(folder) is None
    with monkeypatch.context() as m:
        m.setattr(bpe_direct.metadata, "version", lambda name: "4.57.1")
        assert bpe_direct.load(folder) is None
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tokenizers", None)
        assert bpe_direct.load(folder) is None


CHILD = """
import json, sys
from pathlib import Path
from deltamerge.sinks.gguf_arch import bpe
out = []
for folder in sys.argv[1:]:
    out.append((bpe.vocab(Path(folder), {})[2], "transformers" in sys.modules))
print(json.dumps(out))
"""


def test_an_admitted_folder_does_not_import_transformers(tmp_path: Path):
    """Falcon's tokenizer as transformers saves it, Qwen2's (Qwen2Tokenizer) and GPT-2's (GPT2Tokenizer)
    are read without transformers; GPT-2's on a phi3 model (TokenizersBackend swapped in) after it
    imports it."""
    folders = [llamacpp_folder(tmp_path, name) for name in ("falcon", "qwen2", "gpt-2")]
    folders.append(llamacpp_folder(tmp_path / "phi3", "gpt-2"))
    (folders[-1] / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, folders)], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [["falcon", False], ["qwen2", False], ["gpt-2", False], ["gpt-2", True]]


def test_gguf_through_bpe_direct_is_the_converters(tmp_path: Path):
    """A whole f16 GGUF of a tiny LLaMA whose GPT-2 vocabulary has Meta's tokenizer_config.json
    shape and added tokens of each kind (one only in tokenizer_config.json): the converter's bytes."""
    source = llamacpp_dir() / "tokenizers" / "gpt-2"
    tj = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    n = len(tj["model"]["vocab"])
    plain = {"single_word": False, "lstrip": False, "rstrip": False}
    extra = [("<|begin_of_text|>", True, False), ("<|user|>", False, False), ("hello  world", False, False),
             ("\u2581tab", False, True)]
    tj["added_tokens"] += [{"id": n + i, "content": c, "special": s, "normalized": z, **plain}
                           for i, (c, s, z) in enumerate(extra)]
    decoder = decoder_entries(tj)
    decoder[str(n + len(extra))] = {"content": "<|only-in-config|>", "special": True, "normalized": False,
                                    **plain}
    vocab = n + len(extra) + 3
    base = save_checkpoint(llama_state(0, torch.float16, vocab), tmp_path / "base",
                           config=llama_config(vocab, "float16"), tokenizer=False)
    (base / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    (base / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": True, "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert bpe_direct.load(base) is not None
    cli("make-delta", base, perturbed(base, tmp_path / "target", seed=1), tmp_path / "delta")
    ours, theirs = ours_and_converters(base, tmp_path / "delta", tmp_path, "llama3-shaped")
    assert list(ours) == list(theirs)
    [name] = ours
    reader = gguf.GGUFReader(ours[name])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[n + len(extra)] == "<|only-in-config|>" and tokens[n + 3] == " tab"
    assert ours[name].read_bytes() == theirs[name]
