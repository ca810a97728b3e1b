"""make-delta and xor-files deltas resume too, trusting only what they check again.

A killed run leaves its partial folder with a journal; ``--resume`` hashes every journaled file
again and keeps only those that still match, so a kept file that changed since is redone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import llama_state, run_cli, run_in_process, save_checkpoint
from releases import _oa_release, oa_encode

from deltamerge import apply_delta

SHARD = "30000"  # several output shards for the tiny model


def _finished(partial: Path) -> list[str]:
    lines = (partial / "journal.jsonl").read_text().splitlines()[1:]
    return [json.loads(line).get("shard") or json.loads(line)["name"] for line in lines]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("resume-delta")
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target")
    reference = root / "reference"
    proc = run_in_process("make-delta", base, target, reference, "--max-shard-size", SHARD, "-q")
    assert proc.returncode == 0, proc.stderr
    return base, target, reference


def test_make_delta_resumes_and_redoes_a_kept_shard_that_changed(tmp_path: Path, pair):
    base, target, reference = pair
    out = tmp_path / "delta"
    args = ("make-delta", base, target, out, "--max-shard-size", SHARD, "-q", "--block-size", "4096")
    killed = run_cli(*args, env={"DELTAMERGE_KILL_AT": "shard:3"})
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".delta.deltamerge-partial"
    finished = _finished(partial)
    assert len(finished) == 3 and not out.exists()
    _flip_a_byte(partial / finished[1])  # the journal's sha256 no longer holds for it

    refused = run_in_process(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = run_in_process(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out) == _files(reference)  # the manifest too: the same digests and sha256s
    notes = json.loads(resumed.stdout)["notes"]
    assert notes == ["resumed: 2 finished shard(s) kept, each hashed again"]
    assert not partial.exists()
    rebuilt = apply_delta(base, out, tmp_path / "rebuilt")
    assert rebuilt.verified


def test_xor_files_resume_and_workers(tmp_path: Path):
    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta, compress=False)
    reference = apply_delta(base, delta, tmp_path / "reference", workers=1)
    names = reference.shards
    assert len(names) > 3

    out = tmp_path / "out"
    args = ("apply", base, delta, out, "-q", "--workers", "1")
    killed = run_cli(*args, env={"DELTAMERGE_KILL_AT": "shard:3"})
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".out.deltamerge-partial"
    finished = _finished(partial)
    assert len(finished) == 3
    _flip_a_byte(partial / finished[0])

    refused = run_in_process(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_in_process("apply", base, delta, out, "--workers", "3", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["model_digest"] == reference.model_digest
    assert "resumed: 2 decoded file(s) kept, each hashed again" in result["notes"]
    assert _files(out) == _files(tmp_path / "reference")
    assert not partial.exists()

    parallel = apply_delta(base, delta, tmp_path / "parallel", workers=4)
    assert parallel.model_digest == reference.model_digest
    assert _files(tmp_path / "parallel") == _files(tmp_path / "reference")
