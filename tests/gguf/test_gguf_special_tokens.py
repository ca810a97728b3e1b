"""Special tokens and tokenizer flags in the header, as the pinned converter's own gguf-py writes them.

The converter imports the gguf-py vendored beside it, whose ``SpecialVocab`` differs from the
PyPI gguf package's that deltamerge depends on (a ``ByteLevel`` post-processor's default add
flags, the post-processor winning over tokenizer_config.json, the normalizer keys): deltamerge
mirrors it in ``sinks/gguf_special.py``. The tokenizer folders here are shaped as the published
ones are (Llama 3.x's ``Sequence[ByteLevel, TemplateProcessing]``, SmolLM's and Qwen2's plain
``ByteLevel``...), which the vocab GGUFs rebuilt by transformers for the other GGUF tests are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llamacpp import llamacpp_dir

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf_models import cli, ours_and_converters, perturbed  # noqa: E402
from helpers import llama_config, llama_state, save_checkpoint  # noqa: E402

from deltamerge.sinks.gguf_special import SpecialVocab  # noqa: E402

BOS3, EOS3, EOT3 = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
ENDOFTEXT = "<|endoftext|>"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def byte_level(prefix: bool = True, regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": False, "use_regex": regex}


def template(first: str | None, last: str | None = None, pair_middle: tuple[str, ...] = ()) -> dict:
    """A ``TemplateProcessing`` as transformers writes it: ``[first] A [last]`` and, for pairs,
    ``[first] A [middle...] B [last]`` (Llama 3's repeats its bos before B)."""
    def special(token: str, type_id: int = 0) -> dict:
        return {"SpecialToken": {"id": token, "type_id": type_id}}
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    head = [special(first)] if first else []
    tail = [special(last)] if last else []
    tokens = {t for t in (first, last, *pair_middle) if t}
    return {"type": "TemplateProcessing", "single": [*head, a, *tail],
            "pair": [*head, a, *(special(t, 1) for t in pair_middle), b, *tail],
            "special_tokens": {t: {"id": t, "ids": [0], "tokens": [t]} for t in tokens}}


# (tokenizer.json's post_processor, its normalizer, tokenizer_config.json or None, pairs merges?)
VARIANTS = {
    # Meta-Llama-3.1-8B-Instruct
    "llama3": (
        {"type": "Sequence", "processors": [byte_level(), template(BOS3, pair_middle=(BOS3,))]}, None,
        {"bos_token": BOS3, "eos_token": EOT3, "chat_template": CHAT, "clean_up_tokenization_spaces": True,
         "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, True),
    # SmolLM-135M: a plain ByteLevel post-processor
    "smollm": (byte_level(), None, {"add_prefix_space": False, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                                    "unk_token": ENDOFTEXT, "tokenizer_class": "GPT2Tokenizer"}, False),
    # Qwen2.5: ByteLevel without regex, NFC, no bos token and add_bos_token false
    "qwen2": (byte_level(False, False), {"type": "NFC"},
              {"add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": ENDOFTEXT,
               "pad_token": ENDOFTEXT, "tokenizer_class": "Qwen2Tokenizer"}, True),
    "lowercase-normalizers": (byte_level(), {"type": "Sequence", "normalizers": [
        {"type": "NFD"}, {"type": "Lowercase"}, {"type": "StripAccents"}]}, {"eos_token": ENDOFTEXT}, False),
    "bert-normalizer": (template("[CLS]", "[SEP]", ("[SEP]",)), {
        "type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "strip_accents": None,
        "lowercase": True}, {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]"}, False),
    # tokenizer_config.json's add flags disagree with the template: the template wins
    "config-disagrees": (template(BOS3), None, {"add_bos_token": False, "add_eos_token": True,
                                                "bos_token": BOS3, "eos_token": EOS3}, False),
    # a leading token that is neither bos nor cls becomes both; a trailing one, eos (eot keeps eos)
    "template-names-tokens": (template(BOS3, EOT3), None, {"eos_token": EOS3}, False),
    "roberta": ({"type": "RobertaProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1],
                 "trim_offsets": True, "add_prefix_space": False}, None,
                {"bos_token": BOS3, "eos_token": EOS3}, False),
    "no-tokenizer-config": ({"type": "Sequence", "processors": [byte_level(), template(BOS3)]}, None, None,
                            True),
}
ADDED = [BOS3, EOS3, EOT3, ENDOFTEXT, "[CLS]", "[SEP]", "[UNK]"]


def tokenizer_folder(folder: Path, post: dict, normalizer: dict | None, config: dict | None,
                     pair_merges: bool) -> Path:
    """A small BPE tokenizer.json (its vocabulary is not what these tests look at) and
    tokenizer_config.json, with the given post-processor and normalizer."""
    folder.mkdir()
    vocab = {t: i for i, t in enumerate(["a", "b", "ab", "\u0120a", "\u0120ab", "a b"])}
    merges = [["a", "b"], ["\u0120", "a"], ["a", " b"]] if pair_merges else ["a b", "\u0120 a"]
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(ADDED)]
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": byte_level(),
        "post_processor": post, "decoder": byte_level(),
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "ignore_merges": False}}))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CONVERTERS_HEADER = """
import sys
from pathlib import Path
import gguf
for folder in map(Path, sys.argv[1:]):
    writer = gguf.GGUFWriter(folder / "theirs.gguf", "llama")
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
"""


def header(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def test_special_vocab_writes_the_vendored_converters_keys(tmp_path: Path):
    """Each variant's special-token keys, written by the converter's own ``SpecialVocab`` (run
    with its gguf-py, as the converter runs) and by ours: the same key/values, the same bytes."""
    root = llamacpp_dir()
    folders = [tokenizer_folder(tmp_path / name, *variant) for name, variant in VARIANTS.items()]
    for folder in folders:
        writer = gguf.GGUFWriter(folder / "ours.gguf", "llama")
        SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    done = subprocess.run([sys.executable, "-c", CONVERTERS_HEADER, *map(str, folders)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for folder in folders:
        ours, theirs = header(folder / "ours.gguf"), header(folder / "theirs.gguf")
        assert ours == theirs, folder.name
        assert (folder / "ours.gguf").read_bytes() == (folder / "theirs.gguf").read_bytes(), folder.name
    llama3 = header(tmp_path / "llama3" / "ours.gguf")
    assert llama3["tokenizer.ggml.add_bos_token"] is True and llama3["tokenizer.ggml.add_eos_token"] is False
    assert llama3["tokenizer.ggml.eos_token_id"] == 6 + ADDED.index(EOT3)
    lowercase = header(tmp_path / "lowercase-normalizers" / "ours.gguf")
    assert lowercase["tokenizer.ggml.normalizer.lowercase"] is True
    assert lowercase["tokenizer.ggml.normalizer.strip_accents"] is True


def test_smollm_shaped_tokenizer_gguf_is_the_converters(tmp_path: Path):
    """A whole f16 GGUF of a tiny LLaMA with SmolLM's tokenizer files (a plain ``ByteLevel``
    post-processor, on GPT-2's vocabulary: a whole Llama 3 vocabulary, whose template's bos
    the pre-tokenizer hash needs, would cost the suite a minute): the converter's bytes, whose
    header says ``add_bos_token=false`` and ``add_eos_token=false``."""
    source = llamacpp_dir() / "tokenizers" / "gpt-2"
    if not source.is_dir():
        pytest.fail(f"{source} is missing: scripts/fetch_llamacpp.sh rebuilds it")
    tokenizer = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = byte_level()
    vocab = len(tokenizer["model"]["vocab"])
    base = save_checkpoint(llama_state(0, torch.float16, vocab), tmp_path / "base",
                           config=llama_config(vocab, "float16"), tokenizer=False)
    (base / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    (base / "tokenizer_config.json").write_text(json.dumps(VARIANTS["smollm"][2]))
    cli("make-delta", base, perturbed(base, tmp_path / "target", seed=1), tmp_path / "delta")
    ours, theirs = ours_and_converters(base, tmp_path / "delta", tmp_path, "smollm-ish")
    assert list(ours) == list(theirs)
    [(name, path)] = ours.items()
    fields = header(path)
    assert fields == header(tmp_path / "converted" / name)
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert path.read_bytes() == theirs[name]
