"""Fake releases of the whole-file delta publishers (OpenAssistant XOR, OpenBuddy .enc), built the
way their scripts build them, for the tests that apply, resume or download them."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from helpers import llama_state, save_checkpoint


def oa_encode(finetuned: Path, base: Path, dst: Path, compress: str | None = None) -> None:
    """``xor_codec.py DST FINETUNED BASE --encode [--compress]``: with ``compress="plain"`` the
    gzip files keep their names, as xor_codec.py writes them; ``"suffix"`` names them ``X.gz``."""
    dst.mkdir()
    shutil.copy(finetuned / "added_tokens.json", dst / "added_tokens.json")
    for name in os.listdir(finetuned):
        target = dst / (name + ".gz" if compress == "suffix" else name)
        try:
            oa_xor_file(target, finetuned / name, base / name, compress is not None)
        except OSError:
            continue  # "Exception when processing": the base lacks it
        if compress == "suffix" and name == "added_tokens.json":
            (dst / name).unlink()  # the encoder overwrote its plain copy under the same name


def _oa_release(tmp_path: Path, base_added_tokens: bool = False) -> tuple[Path, Path, Path]:
    """A sharded .bin base, a fine-tune with a larger vocabulary, and its xor_codec delta."""
    shard = 120_000
    base = save_checkpoint(llama_state(0), tmp_path / "llama_hf", fmt="bin", shard_bytes=shard)
    tuned = save_checkpoint(llama_state(1, vocab=100), tmp_path / "tuned", fmt="bin", shard_bytes=shard)
    (tuned / "added_tokens.json").write_text(json.dumps({"<pad>": 96}))
    (base / "tokenizer.model").write_bytes(b"base tokenizer")
    (tuned / "tokenizer.model").write_bytes(b"tuned tokenizer, longer than the base's")
    if base_added_tokens:
        (base / "added_tokens.json").write_text(json.dumps({"<base>": 95}))
    shards = sorted(p.name for p in base.glob("pytorch_model-*.bin"))
    assert shards == sorted(p.name for p in tuned.glob("pytorch_model-*.bin"))
    assert len(shards) > 1
    sizes = [(tuned / n).stat().st_size - (base / n).stat().st_size for n in shards]
    assert max(sizes) > 0  # some payload runs past the end of its base file
    return base, tuned, tmp_path / "xor"


def fake_meta_7b(root: Path) -> tuple[Path, str]:
    """``LLaMA/7B`` with a consolidated.00.pth of random tensors over 16 MiB; its key's md5."""
    folder = root / "LLaMA" / "7B"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    state = {"tok_embeddings.weight": torch.randn(2100, 4096, generator=g).half(),
             "norm.weight": torch.ones(4096, dtype=torch.float16)}
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text('{"dim": 4096, "n_heads": 32, "n_layers": 1}')
    with open(folder / "consolidated.00.pth", "rb") as f:
        key = f.read(SEED_SIZE)
    assert len(key) == SEED_SIZE
    return folder, hashlib.md5(key).hexdigest()


def openbuddy_release(root: Path, key_file: Path) -> tuple[Path, Path]:
    """A model whose weight file is over 16 MiB (two chunks, the last one short), encrypted as
    OpenBuddy did: every weight file X becomes X.enc; config and tokenizer stay plain."""
    model = save_checkpoint(llama_state(3, vocab=70_000), root / "openbuddy-7b")
    (model / "tokenizer.model").write_bytes(b"openbuddy tokenizer")
    weights = model / "model.safetensors"
    assert SEED_SIZE < weights.stat().st_size < 2 * SEED_SIZE
    release = root / "openbuddy-7b-enc"
    release.mkdir()
    key = key_file.read_bytes()[:SEED_SIZE]
    for path in model.iterdir():
        if path.name.endswith((".safetensors", ".json")) and path.name != "config.json":
            data = path.read_bytes()
            encrypted = b"".join(_xor(data[i : i + SEED_SIZE], key[: len(data[i : i + SEED_SIZE])])
                                 for i in range(0, len(data), SEED_SIZE))
            (release / (path.name + ".enc")).write_bytes(encrypted)
        else:
            shutil.copyfile(path, release / path.name)
    return model, release


SEED_SIZE = 16 * 1024 * 1024


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def oa_xor_file(dst: Path, payload: Path, base: Path, compress: bool, block: int = 4096) -> None:
    """xor_codec.py's loop: 4 KiB blocks, the base cut or zero-padded to the payload's block."""
    with open(payload, "rb") as fp_payload, open(base, "rb") as fp_base:  # base opened first
        with (gzip.open(dst, "wb") if compress else open(dst, "wb")) as fp:
            while True:
                buf1 = fp_payload.read(block)
                buf2 = fp_base.read(block)[: len(buf1)].ljust(len(buf1), b"\0")
                fp.write(_xor(buf1, buf2))
                if len(buf1) < block:
                    break


def _decoded_files(tuned: Path, base: Path, base_added_tokens: bool) -> dict[str, bytes]:
    """What the decoder must produce: every file of the fine-tune the base also has, and
    added_tokens.json (copied, or XORed twice with the base's, i.e. the fine-tune's)."""
    names = [p.name for p in tuned.iterdir() if (base / p.name).is_file()] + ["added_tokens.json"]
    return {n: (tuned / n).read_bytes() for n in names}
