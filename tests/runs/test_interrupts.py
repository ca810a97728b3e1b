"""Ctrl-C and SIGTERM end every command cleanly, from the process's first instant to its last (issue 26).

Clean: exit 130 or 143 (or death by that signal), one line on stderr, never a traceback, never a
native abort ("terminate called ..."); OUT absent or finished, never half written; and the same
command with ``--resume`` finishes to the same result.

The random sweep forks each run from a server process that has already imported torch and
deltamerge (a fresh interpreter takes seconds to import torch on a loaded machine), so its
signals land in the work, not in the imports; the start-up and import windows have tests of
their own. DELTAMERGE_INTERRUPT_SWEEP=20 draws 20 moments per command instead of 1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from gguf_models import sp_vocab_size
from helpers import llama_state, one_line, run_cli, save_checkpoint
from meta_helpers import hf_to_meta

from deltamerge import apply_delta, convert, make_delta
from deltamerge.engine.stream import Slot, _run_threads

SWEEP = int(os.environ.get("DELTAMERGE_INTERRUPT_SWEEP", "1"))
PARAMS = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
          "vocab_size": -1}
RUN = ("--block-size", "2048", "-q")
SHARDS = ("--max-shard-size", "30000")  # several shards for the tiny model
MODEL_FILES = (".safetensors", ".gguf", ".pth")

# The server: imports what a run needs, then forks one child per request line (JSON: argv, env,
# stderr path); the child runs the command as `python -m deltamerge` does and ends the way that
# process ends (SystemExit out of this script, the interpreter's own exit), the parent answers
# "pid N" at once and "rc R" when the child has ended.
SERVER = r"""
import json, os, runpy, signal, sys
import torch, deltamerge.apply, deltamerge.make, deltamerge.conversion, deltamerge.cli
import deltamerge.sinks.gguf, deltamerge.sinks.meta_sink
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1); os.dup2(err, 2)
        os.environ.update(job["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal
        sys.argv = ["deltamerge", *job["argv"]]
        runpy.run_module("deltamerge", run_name="__main__")
        raise SystemExit(0)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("rc", os.waitstatus_to_exitcode(status), flush=True)
"""


class Server:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], delay: float | None, sig: int, env: dict | None = None):
        """The command, sent ``sig`` ``delay`` seconds after its fork (None: not at all)."""
        err = self.tmp / f"stderr-{time.monotonic_ns()}.txt"
        job = {"argv": [str(a) for a in argv], "env": env or {}, "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline().split()[1])
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, sig)  # an ended child is reaped only after this: the pid is still its
        rc = int(self.proc.stdout.readline().split()[1])
        return subprocess.CompletedProcess(argv, rc, "", err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def busy():
    """A process spinning beside the runs, as on a shared machine (bounded, ended after)."""
    hog = subprocess.Popen([sys.executable, "-c",
                            "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 300: pass"])
    yield hog
    hog.kill()
    hog.wait()


@pytest.fixture(scope="module")
def world(tmp_path_factory, sp_model: bytes) -> dict:
    root = tmp_path_factory.mktemp("interrupts")
    vocab = sp_vocab_size(sp_model)  # GGUF output needs a tokenizer that fits the model

    def model(seed: int, folder: Path) -> Path:
        path = save_checkpoint(llama_state(seed, torch.float16, vocab), root / folder)
        (path / "tokenizer.model").write_bytes(sp_model)
        return path

    base, delta, target = model(0, "base"), model(1, "delta"), model(2, "target")
    meta = root / "meta"
    hf_to_meta(llama_state(3), PARAMS, 2, meta)
    return {"root": root, "base": base, "delta": delta, "target": target, "meta": meta}


def model_files(folder: Path) -> list[bytes]:
    """The weights files' bytes (a GGUF file is named after its folder: names are not compared)."""
    return sorted(p.read_bytes() for p in folder.iterdir() if p.suffix in MODEL_FILES)


def commands(world: dict) -> dict[str, tuple[list, object]]:
    """Each command's CLI arguments (OUT last but one: filled in per run) and its library twin."""
    base, delta = world["base"], world["delta"]
    return {
        "apply-hf": ([("apply", base, delta), SHARDS],
                     lambda out: apply_delta(base, [delta], out, max_shard_size=30000)),
        "apply-gguf": ([("apply", base, delta), ["--format", "gguf"]],
                       lambda out: apply_delta(base, [delta], out, format="gguf")),
        "apply-meta": ([("apply", base, delta), ["--format", "meta"]],
                       lambda out: apply_delta(base, [delta], out, format="meta")),
        "make-delta": ([("make-delta", base, world["target"]), SHARDS],
                       lambda out: make_delta(base, world["target"], out, max_shard_size=30000)),
        "convert": ([("convert", world["meta"]), SHARDS],
                    lambda out: convert(world["meta"], out, max_shard_size=30000)),
    }


def clean_stop(proc: subprocess.CompletedProcess, sig: int) -> None:
    """The status of that signal, and at most the one-line message on stderr."""
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 128 + sig, -sig), (proc.returncode, proc.stderr)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) <= 1 and all("interrupted" in line for line in lines), proc.stderr


@pytest.mark.parametrize("name", ["apply-hf", "apply-gguf", "apply-meta", "make-delta", "convert"])
def test_signals_at_random_moments_end_cleanly_and_resume(tmp_path, world, server, busy, name):
    """A signal at each of SWEEP moments drawn with a fixed seed, beside a busy process: a clean
    stop, OUT absent or finished, and --resume finishing to the library's own result."""
    (head, extra), reference = commands(world)[name]
    ref = tmp_path / "ref" / "out"  # GGUF files hold their folder's name: the same in every run
    ref.parent.mkdir()
    reference(ref)
    expected = model_files(ref)
    draw = random.Random(f"interrupts-{name}")
    for i in range(SWEEP):
        out = tmp_path / f"run{i}" / "out"
        out.parent.mkdir()
        argv = [*head, out, *RUN, *extra, "--workers", str(draw.choice([1, 2]))]
        sig = draw.choice([signal.SIGINT, signal.SIGTERM])
        stopped = server.run(argv, draw.uniform(0.0, 0.6), sig)
        clean_stop(stopped, sig)
        if out.exists():
            assert model_files(out) == expected, f"{name}: a half-written OUT"
            continue
        resumed = server.run([*argv, "--resume"], None, sig)
        assert resumed.returncode == 0, resumed.stderr
        assert model_files(out) == expected


def wait_for_handlers(pid: int) -> None:
    """Until the process catches SIGTERM, that is until deltamerge's handlers are in."""
    bit = 1 << (signal.SIGTERM - 1)
    for _ in range(20000):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
        if caught & bit:
            return
        time.sleep(0.0005)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_start_up_ends_with_the_one_line(tmp_path, world, sig):
    """attack: a signal the moment deltamerge's handlers are in, while click and the command's
    modules are still being imported -> outcome: 130 or 143 and the one line (was: Ctrl-C gave
    a KeyboardInterrupt traceback; SIGTERM before the command ran killed it silently)."""
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, runpy, sys\n"
         "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
         f"sys.argv = ['deltamerge', 'apply', {str(world['base'])!r}, {str(world['delta'])!r}, "
         f"{str(out)!r}, '-q']\nrunpy.run_module('deltamerge', run_name='__main__')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_handlers(child.pid)
    child.send_signal(sig)
    _, err = child.communicate(timeout=300)
    one_line(subprocess.CompletedProcess([], child.returncode, "", err), 128 + sig,
             "interrupted", "nothing was written")
    assert not out.exists() and not (tmp_path / ".out.deltamerge-partial").exists()


# Sends SIGTERM to the process as numpy starts to be imported (torch imports it, and swallows an
# exception raised there): before the fix the signal was lost and the run went on (exit 0), or
# `--format meta` failed later with "ImportError: cannot load module more than once per process".
TERM_IN_IMPORT = """
import importlib.abc, os, signal, sys
class Trap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, Trap())
"""


def test_a_signal_inside_an_import_waits_for_the_import(tmp_path, world):
    """attack: SIGTERM while torch imports numpy -> outcome: the import finishes, then the run
    stops: 143 and the one line, nothing written."""
    out = tmp_path / "out"
    proc = run_cli("apply", world["base"], world["delta"], out, "--format", "meta", "-q",
                   prelude=TERM_IN_IMPORT)
    one_line(proc, 143, "interrupted")
    assert not out.exists()


# Ctrl-C just after OUT is published (the final rename), before the command returns.
INT_AFTER_PUBLISH = """
import os, signal
signal.signal(signal.SIGINT, signal.default_int_handler)
import deltamerge.sinks.folder as folder
publish = folder.publish
def published(tmp, out, *args):
    publish(tmp, out, *args)
    os.kill(os.getpid(), signal.SIGINT)
folder.publish = published
"""


def test_ctrl_c_after_out_is_published(tmp_path, world):
    """attack: Ctrl-C the instant OUT is published -> outcome: 130, one line, no traceback, and
    OUT finished."""
    out = tmp_path / "out"
    proc = run_cli("apply", world["base"], world["delta"], out, "-q", prelude=INT_AFTER_PUBLISH)
    one_line(proc, 130, "interrupted")
    apply_delta(world["base"], [world["delta"]], tmp_path / "ref")
    assert model_files(out) == model_files(tmp_path / "ref")


def test_ctrl_c_waits_for_the_pipeline_threads():
    """attack: Ctrl-C while the engine's feeder thread is inside a call that releases the GIL
    (as a stage inside torch does) -> outcome: the KeyboardInterrupt leaves the engine only once
    every thread is out of its work (was: Thread.join, interrupted, marked the live thread
    stopped and returned; the process exited with it inside torch, and C++ aborted the process:
    "terminate called without an active exception")."""
    inside = []

    class Item:
        slot = None

    def slow_blocks():
        while True:
            inside.append(1)
            time.sleep(0.3)  # releases the GIL, as torch's kernels do
            inside.pop()
            yield Item()

    def stage(b: Item) -> None:
        pass

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _run_threads(slow_blocks(), [stage], [Slot(1)])
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inside == []
