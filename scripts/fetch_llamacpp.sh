#!/usr/bin/env bash
# llama.cpp's convert_hf_to_gguf.py at the pinned release, for the tests that compare GGUF output
# with it byte for byte. It is not a dependency: the llama-cpp-python source distribution vendors
# it, so pip fetches that (once) and the converter, its conversion/ package, gguf-py and the vocab
# GGUFs (real tokenizers) are extracted to a gitignored cache folder. scripts/llamacpp_vocab.py
# rebuilds the tests' tokenizers as Hugging Face tokenizer folders, once (slow), into its
# tokenizers/ (scripts/bench.py --arch builds the others it needs there). Prints the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DEST=.cache/llama.cpp-$VERSION
if [ ! -f "$DEST/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$VERSION"
  top=llama_cpp_python-$VERSION/vendor/llama.cpp
  tar -xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" --wildcards \
    "$top/convert_hf_to_gguf.py" "$top/conversion/*" "$top/gguf-py/*" "$top/models/ggml-vocab-*.gguf"
  mkdir -p .cache
  rm -rf "$DEST"
  mv "$tmp/$top" "$DEST"
fi
python scripts/llamacpp_vocab.py "$DEST" gpt-2 qwen2 falcon llama-bpe >&2  # the tests' (each built once)
echo "$PWD/$DEST"
