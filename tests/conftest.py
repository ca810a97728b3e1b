"""Fixtures every test file can ask for by name; the functions they use live in helpers.py."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from helpers import llama_state, save_checkpoint


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_checkpoint(llama_state(0), tmp_path / "base")


@pytest.fixture(scope="session")
def hf_modules_cache(tmp_path_factory):
    """Where ``trust_remote_code`` copies a model's code: one folder for the whole session (the
    package transformers imports it as is cached with its path), never ~/.cache."""
    import transformers.dynamic_module_utils as dynamic

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf-modules")))
        yield


@pytest.fixture(scope="session")
def sp_model() -> bytes:
    """A tiny sentencepiece BPE with byte fallback, LLaMA's kind of tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    words = "the quick brown fox jumps over the lazy dog llama alpaca vicuna mistral merge".split()
    rnd = random.Random(0)
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, hard_vocab_limit=False, num_threads=1)
    return buf.getvalue()
