"""Corrupt downloads (issue 3): each is named for what it is, in one line, before any work starts.

Every case is checked twice: through ``open_checkpoint`` (a :class:`FormatError`) and through
``deltamerge apply`` as a user runs it (exit 2, one line naming the file, no traceback, and
neither OUT nor its partial folder left behind), the latter for a delta without a manifest and
with one of either format: the damage is named for what it is, not as a checksum mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    apply_in_process,
    join_safetensors,
    llama_state,
    run_cli,
    save_checkpoint,
    split_safetensors,
    with_manifest_format,
)

from deltamerge.errors import FormatError
from deltamerge.formats.safetensors import read_header
from deltamerge.sources import open_checkpoint
from deltamerge.sources.torch_bin import load_torch_file

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4b0d9e1c2a8f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4\n"
    "size 13476831232\n"
)


def _lfs(path: Path) -> None:
    path.write_text(LFS_POINTER)


def _cut(fraction: float) -> Callable[[Path], None]:
    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return cut


def _cut_in_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:40])


def _garble_header(path: Path) -> None:
    """Same length, same data, a header that is no longer JSON (a flipped run of bytes)."""
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff\xfe#not-json!?\x00\x01\x02\x03"
    path.write_bytes(bytes(data))


def _rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    header, body = split_safetensors(path.read_bytes())
    change(header)
    path.write_bytes(join_safetensors(header, body, pad=True))


def _overlap(path: Path) -> None:
    """Move one tensor's range onto its neighbour's: offsets that do not fit the file."""

    def change(header: dict) -> None:
        entries = sorted(
            (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
        )
        a, b = entries[0], entries[1]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    _rewrite_header(path, change)


def _beyond(path: Path) -> None:
    """The last tensor's range runs past the end of the file."""

    def change(header: dict) -> None:
        last = max(
            (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
        )
        last["data_offsets"] = [o + 1024 for o in last["data_offsets"]]

    _rewrite_header(path, change)


def _not_torch(path: Path) -> None:
    path.write_bytes(b"\x00\x11this is not a pickle nor a zip archive" * 20)


def _html(path: Path) -> None:
    path.write_text("<!DOCTYPE html>\n<html><body>Rate limited</body></html>\n")


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


# (case id, format of the delta, sharded, which file to damage, damage, words the message needs)
CASES = [
    ("lfs-safetensors", "safetensors", False, "weights", _lfs,
     ["a Git LFS pointer, not the weights", "git lfs pull"]),
    ("lfs-bin", "bin", False, "weights", _lfs, ["a Git LFS pointer, not the weights", "git lfs pull"]),
    ("lfs-index", "safetensors", True, "index", _lfs,
     ["a Git LFS pointer, not the weights", "git lfs pull"]),
    ("truncated-safetensors", "safetensors", False, "weights", _cut(0.5), ["truncated"]),
    ("truncated-safetensors-header", "safetensors", False, "weights", _cut_in_header, ["truncated"]),
    ("truncated-shard", "safetensors", True, "weights", _cut(0.7), ["truncated"]),
    ("truncated-bin", "bin", False, "weights", _cut(0.5), ["truncated"]),
    ("header-not-json", "safetensors", False, "weights", _garble_header, ["header does not parse"]),
    ("offsets-overlap", "safetensors", False, "weights", _overlap, ["overlaps"]),
    ("offsets-beyond-file", "safetensors", False, "weights", _beyond, ["run past the end"]),
    ("bin-not-torch", "bin", False, "weights", _not_torch, ["not a PyTorch checkpoint"]),
    ("html-page", "safetensors", False, "weights", _html, ["an HTML page"]),
]
# Also run as a separate process, exactly as a user runs it (the rest run the same CLI in-process).
SUBPROCESS_CASES = {"lfs-safetensors", "truncated-bin", "header-not-json"}


def _damaged_delta(
    tmp_path: Path, fmt: str, sharded: bool, target: str, damage, manifest: int | None = None,
    base: Path | None = None,
) -> Path:
    delta = save_checkpoint(
        llama_state(1), tmp_path / "delta", fmt=fmt, shard_bytes=40_000 if sharded else None
    )
    if manifest is not None:
        assert base is not None
        with_manifest_format(manifest, delta, base, tmp_path / "scratch", always=True)
    if target == "index":
        victim = next(delta.glob("*.index.json"))
    else:
        victim = _shards(delta)[-1]
    damage(victim)
    return victim


@pytest.mark.parametrize(
    "fmt, sharded, target, damage, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_open_checkpoint_names_the_damage(tmp_path, fmt, sharded, target, damage, words):
    victim = _damaged_delta(tmp_path, fmt, sharded, target, damage)
    with pytest.raises(FormatError) as info:
        open_checkpoint(tmp_path / "delta")
    message = str(info.value)
    assert "\n" not in message
    assert str(victim) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("manifest", [None, 2, 1], ids=["no-manifest", "format2", "format1"])
@pytest.mark.parametrize(
    "case, fmt, sharded, target, damage, words", CASES, ids=[c[0] for c in CASES]
)
def test_apply_refuses_damaged_delta(tmp_path, case, fmt, sharded, target, damage, words, manifest):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    victim = _damaged_delta(tmp_path, fmt, sharded, target, damage, manifest, base)
    out = tmp_path / "out"
    if case in SUBPROCESS_CASES and manifest is None:
        r = run_cli("apply", base, tmp_path / "delta", out, "-q")
        code, stderr = r.returncode, r.stderr
    else:
        code, stderr = apply_in_process(base, tmp_path / "delta", out)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("deltamerge: error: ")
    assert victim.name in lines[0]
    for word in words:
        assert word in lines[0]
    assert not out.exists()
    assert not (tmp_path / ".out.deltamerge-partial").exists()


def test_damaged_base_is_refused_the_same_way(tmp_path):
    base = save_checkpoint(llama_state(0), tmp_path / "base", fmt="bin")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta")
    _lfs(base / "pytorch_model.bin")
    out = tmp_path / "out"
    code, stderr = apply_in_process(base, delta, out)
    assert code == 2
    assert "pytorch_model.bin: a Git LFS pointer, not the weights" in stderr
    assert not out.exists() and not (tmp_path / ".out.deltamerge-partial").exists()


def test_trailing_bytes_after_the_last_tensor(tmp_path):
    folder = save_checkpoint(llama_state(0), tmp_path / "m")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(FormatError, match="16 bytes after the last tensor"):
        read_header(folder / "model.safetensors")


def test_empty_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="empty file"):
        read_header(tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match="empty file"):
        load_torch_file(tmp_path / "pytorch_model.bin")


def test_truncated_bin_with_intact_directory_is_still_refused(tmp_path):
    """A zip whose central directory survives but whose member data is cut short."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    start = data.index(b"\x00\x00\x80\x3f")  # 1.0f, early in the tensor's bytes
    data[start : start + 8000] = b""  # the archive now lies about where its members are
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=str(path)):
        load_torch_file(path)


def test_index_naming_a_missing_shard(tmp_path):
    delta = save_checkpoint(llama_state(1), tmp_path / "delta", shard_bytes=40_000)
    _shards(delta)[0].unlink()
    with pytest.raises(FormatError, match="is missing from"):
        open_checkpoint(delta)


def test_index_disagreeing_with_its_shards(tmp_path):
    delta = save_checkpoint(llama_state(1), tmp_path / "delta", shard_bytes=40_000)
    index = delta / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    first, second = sorted(set(obj["weight_map"].values()))[:2]
    name = next(k for k, v in obj["weight_map"].items() if v == first)
    obj["weight_map"][name] = second
    index.write_text(json.dumps(obj))
    with pytest.raises(FormatError, match="is listed in"):
        open_checkpoint(delta)
