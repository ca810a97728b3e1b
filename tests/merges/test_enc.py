"""OpenBuddy's encrypted releases: files XORed with the first 16 MiB of LLaMA-7B's consolidated.00.pth.

The real key is Meta's weights, so the tests make a fake Meta folder (a random torch.save archive
over 16 MiB) and pass its key's md5 as OpenBuddy's release fixes theirs; one test checks that the
default, OpenBuddy's md5, refuses such a key.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from helpers import apply_in_process, assert_states_equal, load_state, run_in_process
from releases import SEED_SIZE, _xor, fake_meta_7b, openbuddy_release

from deltamerge import apply_delta
from deltamerge.errors import InputError, MismatchError, NotFoundError, VerificationError
from deltamerge.integrity.checks import checksum, verify
from deltamerge.kinds.detect import detect_kind
from deltamerge.kinds.enc import OPENBUDDY_KEY_MD5
from deltamerge.sinks.folder import partial_dir


def decrypt_py(seed_path: Path, folder_path: Path, seed_md5: str) -> None:
    """OpenBuddy's decrypt.py, as it does it: the seed's first 16 MiB, md5 checked; every *.enc
    in the folder read 16 MiB at a time, each chunk XORed with the seed from its start; the
    output beside it, without .enc; an output that exists is skipped."""
    with open(seed_path, "rb") as seed_file:
        seed = seed_file.read(SEED_SIZE)
    assert hashlib.md5(seed).hexdigest() == seed_md5
    for enc_file in glob.glob(os.path.join(folder_path, "*.enc")):
        output_path = os.path.splitext(enc_file)[0]
        if os.path.exists(output_path):
            continue
        with open(enc_file, "rb") as input_file, open(output_path, "wb") as output_file:
            while data := input_file.read(SEED_SIZE):
                output_file.write(_xor(data, seed[: len(data)]))


@pytest.fixture(scope="module")
def openbuddy(tmp_path_factory) -> tuple[Path, str, Path, Path]:
    root = tmp_path_factory.mktemp("openbuddy")
    meta, key_md5 = fake_meta_7b(root)
    model, release = openbuddy_release(root, meta / "consolidated.00.pth")
    return meta, key_md5, model, release


def test_enc_is_decoded_as_decrypt_py_does(openbuddy, tmp_path: Path) -> None:
    """`deltamerge apply LLaMA/7B openbuddy-7b-enc OUT`: kind detected, bytes as decrypt.py's."""
    meta, key_md5, model, release = openbuddy
    reference = shutil.copytree(release, tmp_path / "reference")
    decrypt_py(meta / "consolidated.00.pth", reference, key_md5)
    assert detect_kind(release, None) == "enc"

    done = run_in_process("apply", meta, release, tmp_path / "out", "--key-md5", key_md5)
    assert done.returncode == 0, done.stderr
    assert "(kind: enc)" in done.stdout
    out = tmp_path / "out"
    decoded = {p.name for p in reference.iterdir() if not p.name.endswith(".enc")}
    assert decoded == {p.name for p in out.iterdir()} - {"deltamerge-result.json"}
    for name in decoded:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert_states_equal(load_state(out), load_state(model))
    digest = checksum(out).model_digest
    assert digest == checksum(model).model_digest
    assert f"digest    blake3 {digest}" in done.stdout
    assert verify(out, out / "deltamerge-result.json").ok  # the record names its algorithm


def test_enc_base_may_be_the_pth_file(openbuddy, tmp_path: Path) -> None:
    meta, key_md5, model, release = openbuddy
    result = apply_delta(meta / "consolidated.00.pth", release, tmp_path / "out", key_md5=key_md5)
    assert result.kinds == ["enc"]
    assert result.model_digest == checksum(model).model_digest
    assert sorted(result.shards) == [
        "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (model / "model.safetensors").read_bytes()


def test_a_key_other_than_openbuddys_is_refused_before_writing(openbuddy, tmp_path: Path) -> None:
    """The default key md5 is OpenBuddy's: the fake key is refused, naming both md5s."""
    meta, key_md5, _, release = openbuddy
    code, stderr = apply_in_process(meta, release, tmp_path / "out")
    assert code == 2, stderr
    assert key_md5 in stderr and OPENBUDDY_KEY_MD5 in stderr and "consolidated.00.pth" in stderr
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    with pytest.raises(MismatchError, match=OPENBUDDY_KEY_MD5):
        apply_delta(meta, release, tmp_path / "out", kind="enc", key_md5=OPENBUDDY_KEY_MD5)
    assert OPENBUDDY_KEY_MD5 == "08cf0f43451cc4ae056e0b19e56c1fcf"


def test_enc_base_must_hold_consolidated_00(openbuddy, tmp_path: Path) -> None:
    meta, key_md5, _, release = openbuddy
    with pytest.raises(NotFoundError, match=r"consolidated\.00\.pth.*7B"):
        apply_delta(meta.parent, release, tmp_path / "out", key_md5=key_md5)
    short = tmp_path / "short.pth"
    short.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(MismatchError, match="1004 bytes"):
        apply_delta(short, release, tmp_path / "out", key_md5=key_md5)
    assert not (tmp_path / "out").exists()


def test_damaged_enc_file_is_named_and_nothing_is_left(openbuddy, tmp_path: Path) -> None:
    meta, key_md5, _, release = openbuddy
    damaged = shutil.copytree(release, tmp_path / "damaged")
    payload = damaged / "model.safetensors.enc"
    payload.write_bytes(payload.read_bytes()[:-100])
    with pytest.raises(VerificationError, match=r"model\.safetensors.*model\.safetensors\.enc"):
        apply_delta(meta, damaged, tmp_path / "out", key_md5=key_md5)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_enc_of_files_that_are_no_checkpoint(openbuddy, tmp_path: Path) -> None:
    """The llama.cpp release (q4_0-enc) decodes to a ggml file: decoded, and a files digest."""
    meta, key_md5, _, _ = openbuddy
    key = (meta / "consolidated.00.pth").read_bytes()[:SEED_SIZE]
    ggml = b"tjgg" + bytes(range(256)) * 40
    release = tmp_path / "openbuddy-7b-q4_0-enc"
    release.mkdir()
    (release / "openbuddy-7b-q4_0.bin.enc").write_bytes(_xor(ggml, key[: len(ggml)]))
    result = apply_delta(meta, release, tmp_path / "out", key_md5=key_md5)
    assert (tmp_path / "out" / "openbuddy-7b-q4_0.bin").read_bytes() == ggml
    assert result.kinds == ["enc"] and len(result.model_digest) == 64


def test_enc_refuses_what_does_not_apply(openbuddy, tmp_path: Path) -> None:
    meta, key_md5, model, release = openbuddy
    with pytest.raises(InputError, match="--dtype"):
        apply_delta(meta, release, tmp_path / "out", key_md5=key_md5, dtype="float32")
    with pytest.raises(InputError, match="alone"):
        apply_delta(meta, [release, model], tmp_path / "out", key_md5=key_md5)
    with pytest.raises(InputError, match="--key-md5"):  # (model as BASE too is refused first)
        apply_delta(meta, model, tmp_path / "out", key_md5=key_md5)
    with pytest.raises(InputError, match=r"no \*\.enc files"):
        apply_delta(meta, model, tmp_path / "out", kind="enc", key_md5=key_md5)
    assert not (tmp_path / "out").exists()

