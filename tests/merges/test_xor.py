"""XOR deltas: tensor XOR (make-delta --kind xor) and OpenAssistant's whole-file xor_codec.py."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import assert_states_equal, llama_state, load_state, run_in_process, save_checkpoint
from releases import _decoded_files, _oa_release, oa_encode

from deltamerge import apply_delta, make_delta
from deltamerge.decoders.whole_files import format_problem
from deltamerge.errors import FormatError, InputError, NotFoundError, VerificationError
from deltamerge.kinds.xor_files import looks_like_xor_files
from deltamerge.sinks.folder import partial_dir

# -- tensor XOR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_xor_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    """A target far from the base (where fp16 additive deltas lose bits), with an extra vocab row."""
    base = save_checkpoint(llama_state(0, dtype), tmp_path / "base")
    target_state = llama_state(1, dtype, vocab=97, scale=3.0)
    target = save_checkpoint(target_state, tmp_path / "target")
    made = make_delta(base, target, tmp_path / "delta", kind="xor", block_size=4096)
    assert made.mismatched_elements == 0
    assert json.loads((tmp_path / "delta" / "deltamerge.json").read_text())["kind"] == "xor"

    result = apply_delta(base, tmp_path / "delta", tmp_path / "out", block_size=4096)
    assert result.kinds == ["xor"]
    assert result.verified
    assert_states_equal(load_state(tmp_path / "out"), target_state)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 97


@pytest.mark.parametrize("base_dtype,target_dtype", [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
])
def test_xor_across_dtypes(tmp_path: Path, base_dtype: torch.dtype, target_dtype: torch.dtype) -> None:
    """The base is cast to the delta's dtype before the XOR, on both sides."""
    base = save_checkpoint(llama_state(0, base_dtype), tmp_path / "base")
    target_state = llama_state(1, target_dtype)
    target = save_checkpoint(target_state, tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor")
    result = apply_delta(base, tmp_path / "delta", tmp_path / "out")
    assert result.verified
    assert_states_equal(load_state(tmp_path / "out"), target_state)


def test_xor_refuses_mean_rows(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1, vocab=97), tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor")
    with pytest.raises(InputError, match="XORed with zero"):
        apply_delta(base, tmp_path / "delta", tmp_path / "out", new_rows="mean")
    assert not (tmp_path / "out").exists()


def test_xor_cli_says_it_matches(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    made = run_in_process("make-delta", "--kind", "xor", "-q", base, target, tmp_path / "delta")
    assert made.returncode == 0, made.stderr
    done = run_in_process("apply", base, tmp_path / "delta", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "(kind: xor)" in done.stdout
    assert "matches the publisher's result" in done.stdout


# -- OpenAssistant xor_codec.py, whole files ------------------------------------------------------


def _md5_list(folder: Path, names: list[str], path: Path) -> Path:
    lines = [f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  ./{n}" for n in sorted(names)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("compress", [None, "plain", "suffix"])
@pytest.mark.parametrize("base_added_tokens", [False, True])
def test_xor_files_decode_byte_for_byte(
    tmp_path: Path, compress: str | None, base_added_tokens: bool
) -> None:
    base, tuned, delta = _oa_release(tmp_path, base_added_tokens)
    oa_encode(tuned, base, delta, compress)
    (delta / "README.md").write_text("# oasst xor weights\n")  # in the release, not in the base
    assert looks_like_xor_files(delta)
    expected = _decoded_files(tuned, base, base_added_tokens)
    md5s = _md5_list(tuned, list(expected), tmp_path / "md5.txt")

    result = apply_delta(base, delta, tmp_path / "out", expect_md5=md5s)  # kind detected
    assert result.kinds == ["xor-files"]
    assert result.verified
    assert any("README.md" in n for n in result.notes)
    produced = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    produced.pop("deltamerge-result.json")
    assert produced.keys() == expected.keys()
    for name, data in expected.items():
        assert produced[name] == data, name
    assert_states_equal(load_state(tmp_path / "out"), load_state(tuned))


def test_xor_files_md5_mismatch_names_the_file(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    md5s = _md5_list(tuned, list(_decoded_files(tuned, base, False)), tmp_path / "md5.txt")
    shard = sorted(base.glob("pytorch_model-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # tensor bytes: the archive's structure still decodes fine
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"{shard.name}: decoded md5 .* not byte-identical"):
        apply_delta(base, delta, tmp_path / "out", kind="xor-files", expect_md5=md5s)
    assert not (tmp_path / "out").exists()
    assert not partial_dir(tmp_path / "out").exists()


def test_xor_files_md5_list_of_the_base_is_recognised(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    names = [p.name for p in base.glob("pytorch_model-*.bin")]
    md5s = _md5_list(base, names, tmp_path / "base-md5.txt")
    with pytest.raises(VerificationError, match="lists the base's files"):
        apply_delta(base, delta, tmp_path / "out", expect_md5=md5s)


def test_xor_files_wrong_base_size_is_named_before_writing(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    shard = sorted(base.glob("pytorch_model-*.bin"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)  # an interrupted download
    done = run_in_process("apply", base, delta, tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert str(shard) in done.stderr and "not complete" in done.stderr
    assert not (tmp_path / "out").exists()
    assert not partial_dir(tmp_path / "out").exists()


def test_xor_files_missing_base_shard_is_an_error(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    (base / "pytorch_model.bin.index.json").unlink()
    with pytest.raises(NotFoundError, match="pytorch_model.bin.index.json: missing from the base"):
        apply_delta(base, delta, tmp_path / "out", kind="xor-files")


def test_xor_files_refuses_dtype_and_chains(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    with pytest.raises(InputError, match="--dtype"):
        apply_delta(base, delta, tmp_path / "out", dtype="float32")
    with pytest.raises(InputError, match="not in a chain"):
        apply_delta(base, [delta, delta], tmp_path / "out", allow_repeat=True)
    with pytest.raises(InputError, match="applies to xor-files"):
        apply_delta(base, tuned, tmp_path / "out", expect_md5=tmp_path / "md5.txt")


def test_format_problem_checks_zip_and_zip64_ends(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.bin"
    torch.save({"w": torch.arange(1000)}, path)
    assert format_problem(path) is None
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 0)  # Python then writes the zip64 end records
    path64 = tmp_path / "b.bin"
    with zipfile.ZipFile(path64, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"x" * 5000)
    assert (path64.read_bytes()).find(b"PK\x06\x06") > 0
    assert format_problem(path64) is None
    for p in (path, path64):
        data = p.read_bytes()
        p.write_bytes(data[:-30])
        assert "truncated" in format_problem(p)
        p.write_bytes(data + b"\0" * 10)
        assert format_problem(p) is not None
    pointer = tmp_path / "c.safetensors"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    assert "LFS" in format_problem(pointer)


def test_md5_list_lines_are_validated(tmp_path: Path) -> None:
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    bad = tmp_path / "md5.txt"
    bad.write_text("not a checksum line\n")
    with pytest.raises(FormatError, match="line 1"):
        apply_delta(base, delta, tmp_path / "out", expect_md5=bad)


def test_xor_files_compressed_under_plain_names_are_decoded(tmp_path: Path) -> None:
    """xor_codec.py --compress keeps the names: the gzip header, not the name, says compressed."""
    base, tuned, delta = _oa_release(tmp_path, base_added_tokens=True)
    oa_encode(tuned, base, delta, compress="plain")
    assert not list(delta.glob("*.gz"))
    assert (delta / "config.json").read_bytes()[:2] == b"\x1f\x8b"
    assert looks_like_xor_files(delta)
    done = run_in_process("apply", base, delta, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "(kind: xor-files)" in done.stdout
    for name, data in _decoded_files(tuned, base, True).items():
        assert (tmp_path / "out" / name).read_bytes() == data, name
