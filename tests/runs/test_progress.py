"""Progress that says where it is: the bar names the shard and tensor at work and gives an ETA,
and the long steps before the main pass (the md5 of Meta's checklist, re-checking what a
resumed run keeps) show bars of their own. Bars are drawn on a terminal only, so the tests give
the process a stderr that says it is one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from helpers import ETA, Terminal, llama_state, run_cli, save_checkpoint
from meta_helpers import hf_to_meta

from deltamerge import apply_delta, make_delta
from deltamerge.integrity.checks import checksum


@pytest.fixture
def stderr(monkeypatch) -> Terminal:
    """A terminal for stderr, set when the test body starts (pytest's capture sets its own at
    the start of each phase, after the fixtures)."""
    fake = Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    return fake


def on_terminal(stderr: Terminal) -> None:
    sys.stderr = stderr  # restored by the fixture's monkeypatch


def test_the_bar_names_the_shard_and_the_tensor_and_gives_an_eta(tmp_path: Path, stderr):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta")
    on_terminal(stderr)
    apply_delta(base, delta, tmp_path / "out", max_shard_size=60_000, progress=True)
    shown = stderr.getvalue()
    assert "rebuilding" in shown and ETA.search(shown)
    last = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1].name
    assert re.search(re.escape(last) + r": lm_head\.weight|" + re.escape(last) + r": model\.", shown)

    stderr.seek(0)
    stderr.truncate()
    checksum(tmp_path / "out", progress=True)
    assert "hashing" in stderr.getvalue() and f"{last}: " in stderr.getvalue()


def test_meta_checklist_md5_shows_progress(tmp_path: Path, stderr):
    params = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
              "vocab_size": -1}
    meta = tmp_path / "7B"
    hf_to_meta(llama_state(0), params, 2, meta)
    on_terminal(stderr)
    checksum(meta, progress=True)
    shown = stderr.getvalue()
    final = re.search(r"md5 \(checklist\.chk\): 100%[^\r\n]*", shown)
    assert final and ETA.search(final[0]), shown
    assert re.search(r"(consolidated\.0[01]\.pth|params\.json)\] *$", final[0]), final[0]

    stderr.seek(0)
    stderr.truncate()
    checksum(meta)  # progress not asked for: no bar, for the pre-step either
    assert stderr.getvalue() == ""


def test_a_resumed_make_delta_shows_its_re_check(tmp_path: Path, stderr):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    target = save_checkpoint(llama_state(1), tmp_path / "target")
    killed = run_cli("make-delta", base, target, tmp_path / "delta", "--max-shard-size", "30000",
                     "-q", env={"DELTAMERGE_KILL_AT": "shard:2"})
    assert killed.returncode == -9, killed.stderr
    on_terminal(stderr)
    make_delta(base, target, tmp_path / "delta", max_shard_size=30_000, resume=True,
               progress=True)
    assert "re-checking kept shards" in stderr.getvalue()
