"""Compressed XOR deltas (make-delta --kind xor --compress): zstd frames of byte planes,
bit-exact both ways, detected from the files, refused when a frame is damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_states_equal,
    llama_state,
    load_state,
    one_line,
    run_cli,
    run_in_process,
    save_checkpoint,
)

from deltamerge import apply_delta, make_delta
from deltamerge.formats.safetensors import read_header
from deltamerge.formats.xor_zstd import INDEX_KEY
from deltamerge.kinds.marks import KIND_KEY

pytest.importorskip("zstandard")

SHARD = "30000"  # several shards for the tiny model


def _fine_tune(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The base with its lowest mantissa bits perturbed, as a fine-tune moves weights: the XOR's
    high bytes (sign, exponent) stay zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
        noise = torch.randint(0, 16, t.shape, generator=g).to(bits)
        out[name] = (t.view(bits) ^ noise).view(t.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact_and_detected(tmp_path: Path, dtype: torch.dtype) -> None:
    """Blocks of 4096 bytes cut tensors into several frames; apply reads with other blocks
    (8192), so rows are taken from frames they do not start with; an extra vocab row too."""
    base = save_checkpoint(llama_state(0, dtype), tmp_path / "base")
    target_state = llama_state(1, dtype, vocab=97, scale=3.0)
    target = save_checkpoint(target_state, tmp_path / "target")
    made = make_delta(base, target, tmp_path / "delta", kind="xor", compress=True,
                      block_size=4096, max_shard_size=SHARD)
    assert made.mismatched_elements == 0
    manifest = json.loads((tmp_path / "delta" / "deltamerge.json").read_text())
    assert manifest["kind"] == "xor-zstd"
    files = sorted((tmp_path / "delta").glob("*.safetensors"))
    assert len(files) > 1
    for path in files:
        header = read_header(path)
        assert header.metadata[KIND_KEY] == "xor-zstd"
        assert {s.spec.dtype for s in header.tensors.values()} == {torch.uint8}
        index = json.loads(header.metadata[INDEX_KEY])
        assert any(len(e["blocks"]) > 1 for e in index.values())

    (tmp_path / "delta" / "deltamerge.json").unlink()  # the marks alone say what it is
    result = apply_delta(base, tmp_path / "delta", tmp_path / "out", block_size=8192)
    assert result.kinds == ["xor-zstd"]
    assert_states_equal(load_state(tmp_path / "out"), target_state)


def test_manifest_verifies_the_decompressed_tensors(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target_state = _fine_tune(llama_state(0), 1)
    target = save_checkpoint(target_state, tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor", compress=True, compress_level=9)
    plain = make_delta(base, target, tmp_path / "plain", kind="xor")
    manifest = json.loads((tmp_path / "delta" / "deltamerge.json").read_text())
    assert manifest["delta"] == json.loads((tmp_path / "plain" / "deltamerge.json").read_text())["delta"]
    result = apply_delta(base, tmp_path / "delta", tmp_path / "out", workers=3)
    assert result.verified and result.model_digest == plain.result_digest
    assert_states_equal(load_state(tmp_path / "out"), target_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_planes_of_a_fine_tune_compress(tmp_path: Path, dtype: torch.dtype) -> None:
    """Against the plain XOR delta of the same pair: every tensor's blob is smaller than its
    plain bytes (the zero high planes compress), so the weight files are too."""
    base_state = llama_state(0, dtype)
    base = save_checkpoint(base_state, tmp_path / "base")
    target = save_checkpoint(_fine_tune(base_state, 1), tmp_path / "target")
    made = make_delta(base, target, tmp_path / "zstd", kind="xor", compress=True)
    plain_made = make_delta(base, target, tmp_path / "plain", kind="xor")
    (zfile,) = (tmp_path / "zstd").glob("*.safetensors")
    (pfile,) = (tmp_path / "plain").glob("*.safetensors")
    plain = read_header(pfile).tensors
    for name, blob in read_header(zfile).tensors.items():
        assert blob.spec.nbytes < plain[name].spec.nbytes, name
    assert made.bytes_written == zfile.stat().st_size < pfile.stat().st_size
    assert plain_made.bytes_written < pfile.stat().st_size  # the plain delta's tensor bytes


def test_corrupt_frame_is_refused_naming_file_and_tensor(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor", compress=True)
    (path,) = (tmp_path / "delta").glob("*.safetensors")
    header = read_header(path)
    name = "model.layers.0.mlp.up_proj.weight"
    stored = header.tensors[name]
    data = bytearray(path.read_bytes())
    data[stored.offset + stored.spec.nbytes // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    proc = run_in_process("apply", base, tmp_path / "delta", tmp_path / "out", "-q")
    line = one_line(proc, 2, path.name, name, "corrupt")
    assert "compressed frame" in line
    assert not (tmp_path / "out").exists()


def test_compress_needs_xor_and_a_zstd_level(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    proc = run_in_process("make-delta", base, target, tmp_path / "d", "--compress", "-q")
    one_line(proc, 2, "--compress", "xor")
    proc = run_in_process("make-delta", base, target, tmp_path / "d", "--kind", "xor", "--compress",
                          "--compress-level", "23", "-q")
    assert proc.returncode == 2 and "--compress-level" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_missing_zstandard_names_the_extra(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    proc = run_cli("make-delta", base, target, tmp_path / "d", "--kind", "xor", "--compress", "-q",
                   prelude="import sys; sys.modules['zstandard'] = None")
    one_line(proc, 2, "deltamerge[zstd]")
    assert not (tmp_path / "d").exists()


def test_resume_keeps_checked_shards(tmp_path: Path) -> None:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    reference = tmp_path / "reference"
    make_delta(base, target, reference, kind="xor", compress=True, max_shard_size=SHARD,
               block_size=4096)
    out = tmp_path / "delta"
    args = ("make-delta", base, target, out, "--kind", "xor", "--compress", "--max-shard-size",
            SHARD, "-q", "--block-size", "4096")
    killed = run_cli(*args, env={"DELTAMERGE_KILL_AT": "shard:2"})
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".delta.deltamerge-partial"
    assert len((partial / "journal.jsonl").read_text().splitlines()) == 3
    resumed = run_in_process(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["notes"] == ["resumed: 2 finished shard(s) kept, each hashed again"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in reference.iterdir()}
    assert apply_delta(base, out, tmp_path / "rebuilt").verified


def test_in_a_chain_and_named_by_kind(tmp_path: Path) -> None:
    """A compressed XOR delta followed by a plain one (into fp32), in one pass; and
    ``--kind xor-zstd`` given for it, which its files agree with."""
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    middle = save_checkpoint(llama_state(1), tmp_path / "middle")
    last_state = llama_state(2, torch.float32)
    last = save_checkpoint(last_state, tmp_path / "last")
    make_delta(base, middle, tmp_path / "first", kind="xor", compress=True)
    make_delta(middle, last, tmp_path / "second", kind="xor")
    result = apply_delta(base, [tmp_path / "first", tmp_path / "second"], tmp_path / "out",
                         block_size=4096)
    assert result.kinds == ["xor-zstd", "xor"] and result.verified
    assert_states_equal(load_state(tmp_path / "out"), last_state)
    alone = apply_delta(base, tmp_path / "first", tmp_path / "alone", kind="xor-zstd")
    assert alone.verified
    assert_states_equal(load_state(tmp_path / "alone"), load_state(middle))
