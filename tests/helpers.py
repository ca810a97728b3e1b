"""Tiny LLaMA-shaped checkpoints in real formats, built by the tests themselves, and the digests
and manifests docs/manifest.md specifies, computed here rather than by deltamerge: the helpers
every test module imports (fixtures are in conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import torch
from safetensors.torch import save_file

from deltamerge.formats.safetensors import read_header

TESTS = Path(__file__).resolve().parent  # the suite's folder: its data/ and tables
ROOT = TESTS.parent  # the project
HIDDEN, HEADS, LAYERS, FFN, VOCAB = 64, 4, 2, 172, 96
ALGORITHMS = ("blake3", "sha256")  # manifest format 2, format 1
FORMAT_ALGORITHM = {2: "blake3", 1: "sha256"}
DTYPE_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def llama_config(vocab: int = VOCAB, dtype: str = "float16", **extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }


def llama_state(
    seed: int,
    dtype: torch.dtype = torch.float16,
    vocab: int = VOCAB,
    scale: float = 0.05,
    inv_freq: bool = False,
) -> dict[str, torch.Tensor]:
    """Random LLaMA tensors with the real names and shapes (a tiny hidden size)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state = {"model.embed_tokens.weight": rnd(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            state[p + f"self_attn.{proj}_proj.weight"] = rnd(HIDDEN, HIDDEN)
        state[p + "mlp.gate_proj.weight"] = rnd(FFN, HIDDEN)
        state[p + "mlp.up_proj.weight"] = rnd(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rnd(HIDDEN, FFN)
        state[p + "input_layernorm.weight"] = (1 + rnd(HIDDEN)).to(dtype)
        state[p + "post_attention_layernorm.weight"] = (1 + rnd(HIDDEN)).to(dtype)
        if inv_freq:
            state[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS))
            )
    state["model.norm.weight"] = (1 + rnd(HIDDEN)).to(dtype)
    state["lm_head.weight"] = rnd(vocab, HIDDEN)
    return state


def save_checkpoint(
    state: dict[str, torch.Tensor],
    folder: Path,
    fmt: str = "safetensors",
    shard_bytes: int | None = None,
    config: dict | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write ``state`` as transformers would: one file, or greedy shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shard_bytes and size and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t.contiguous()
        size += nbytes
    prefix, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{prefix}.{ext}" if len(groups) == 1 else f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.{ext}"
        if fmt == "safetensors":
            save_file(group, folder / name, metadata={"format": "pt"})
        else:
            torch.save(group, folder / name)
        weight_map.update({k: name for k in group})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / f"{prefix}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    vocab = state["model.embed_tokens.weight"].shape[0]
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config or llama_config(vocab, dtype)))
    if tokenizer:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    return folder


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the reference libraries."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        else:
            state.update(torch.load(f, weights_only=True))
    return state


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with ``code`` and one line of stderr holding ``words``; that line."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, prelude: str | None = None
) -> subprocess.CompletedProcess:
    """The real command in a child process, as a user runs it.

    ``prelude`` is Python the child runs first, before anything is imported (to hide a module,
    or set a signal handler), then the command as ``python -m deltamerge`` would.
    """
    full_env = {**os.environ, **(env or {})}
    argv = ["deltamerge", *map(str, args)]
    command = ["-m", "deltamerge", *argv[1:]] if prelude is None else [
        "-c", f"{prelude}\nimport runpy, sys\nsys.argv = {argv!r}\n"
              "runpy.run_module('deltamerge', run_name='__main__')"]
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


def run_in_process(*args: object) -> subprocess.CompletedProcess:
    """``deltamerge ARGS`` through click in this process, answered as :func:`run_cli` answers.

    The same commands, error handling and exit statuses as the child process, without a second
    Python importing torch (seconds a call). An exception click did not turn into an exit is
    printed to stderr as Python prints it, status 1, and the warnings a user's process would show
    (Python's default filters) are printed after the command's stderr: a test of "one line, no
    traceback" still sees them. Tests of signals, kills, the environment, a working folder, what
    a fresh process imports, or an option that sets the process's own state (``--cache-dir`` sets
    huggingface_hub's cache for the process) keep :func:`run_cli`; so does a run in a module that
    monkeypatches deltamerge (test_formats' ``small_groups``) unless the patch is meant for it.
    """
    import traceback
    import warnings

    from click.testing import CliRunner

    from deltamerge.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # Python's defaults, not pytest's: what a user's process shows
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.simplefilter("default", append=True)  # every other category, once a place
        result = CliRunner().invoke(main, [*map(str, args)], prog_name="deltamerge")
    stderr = result.stderr + "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
        code = 1
    return subprocess.CompletedProcess(["deltamerge", *map(str, args)], code, result.stdout, stderr)


def apply_in_process(*args: object) -> tuple[int, str]:
    """``deltamerge apply`` through click in this process: the same error handling, no startup."""
    from click.testing import CliRunner

    from deltamerge.cli import main

    result = CliRunner().invoke(main, ["apply", *map(str, args), "-q"])
    assert isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header, parsed, and the bytes after it."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: object, body: bytes, pad: bool) -> bytes:
    """The file ``header`` and ``body`` make (the header padded to 8 bytes, as writers do)."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# -- digests and manifests, from docs/manifest.md rather than from deltamerge's own code ----------
def hash_hex(data: bytes, algorithm: str) -> str:
    return blake3.blake3(data).hexdigest() if algorithm == "blake3" else hashlib.sha256(data).hexdigest()


def documented_digests(
    state: dict[str, torch.Tensor], algorithm: str = "blake3"
) -> tuple[str, dict[str, str]]:
    """docs/manifest.md, literally: the hash of raw LE bytes; sorted tab-separated lines."""
    tensors = {
        name: hash_hex(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(), algorithm)
        for name, t in state.items()
    }
    lines = "".join(
        f"{name}\t{DTYPE_NAMES[state[name].dtype]}\t"
        f"[{','.join(str(d) for d in state[name].shape)}]\t{tensors[name]}\n"
        for name in sorted(state)
    )
    return hash_hex(lines.encode("utf-8"), algorithm), tensors


def documented_role(state: dict[str, torch.Tensor], algorithm: str) -> dict:
    model, tensors = documented_digests(state, algorithm)
    return {"model_digest": model, "tensors": {
        n: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), algorithm: tensors[n]}
        for n, t in state.items()}}


def write_manifest(
    fmt: int, delta: Path, base: dict[str, torch.Tensor], result: dict[str, torch.Tensor],
    kind: str = "add",
) -> None:
    """A ``deltamerge.json`` for ``delta`` as docs/manifest.md specifies it, written here rather
    than by deltamerge. Format 1 is what deltamerge wrote before format 2: sha256 everywhere,
    whole files only, no delta role. Format 2: BLAKE3, the delta's own tensors, and each
    safetensors file's header. Replaces the delta's manifest (if any)."""
    algorithm = FORMAT_ALGORITHM[fmt]
    manifest = delta / "deltamerge.json"
    manifest.unlink(missing_ok=True)
    files = {}
    for p in sorted(delta.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        entry: dict = {algorithm: hash_hex(data, algorithm), "size": len(data)}
        if fmt == 2 and p.suffix == ".safetensors":
            start = 8 + struct.unpack("<Q", data[:8])[0]
            entry["header"] = {"size": start, algorithm: hash_hex(data[:start], algorithm)}
        files[p.relative_to(delta).as_posix()] = entry
    obj = {
        "format": "deltamerge-manifest", "format_version": fmt, "kind": kind,
        "deltamerge_version": "0.1.0", "options": {"new_rows": "zero"}, "files": files,
        "base": documented_role(base, algorithm), "result": documented_role(result, algorithm),
    }
    if fmt == 2:
        obj["delta"] = documented_role(load_state(delta), algorithm)
    manifest.write_text(json.dumps(obj, indent=1))


def with_manifest_format(
    fmt: int, delta: Path, base: Path, scratch: Path, kind: str = "add", always: bool = False
) -> str:
    """Leave ``delta`` as make-delta made it (format 2), or write its manifest as ``fmt`` (the
    result role from applying it unchecked into ``scratch``); the algorithm that implies.
    ``always`` writes a format 2 manifest too (for deltas make-delta did not make)."""
    if fmt == 1 or always:
        from deltamerge import apply_delta

        apply_delta(base, delta, scratch, verify=False, kind=kind)
        write_manifest(fmt, delta, load_state(base), load_state(scratch), kind)
        shutil.rmtree(scratch)
    return FORMAT_ALGORITHM[fmt]


def flip_bit(file: Path, tensor: str, byte: int = 3, bit: int = 0) -> None:
    """Flip one bit of one tensor's data in a safetensors file, in place."""
    stored = read_header(file).tensors[tensor]
    data = bytearray(file.read_bytes())
    data[stored.offset + byte] ^= 1 << bit
    file.write_bytes(bytes(data))


def fine_tune(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A plausible fine-tune: the base plus small changes to every tensor."""
    noise = llama_state(seed, vocab=state["model.embed_tokens.weight"].shape[0], scale=0.005)
    return {k: (v.float() + noise[k].float()).to(v.dtype) for k, v in state.items()}


GROUP = "30000"  # the hf format's default shard size, made small: several tensor groups


PRELUDE = f"import deltamerge.apply as a; a.DEFAULT_SHARD_SIZE = {GROUP!r}"


def file_holding(folder: Path, tensor: str) -> Path:
    """The safetensors shard of ``folder`` that stores ``tensor``."""
    for f in sorted(folder.glob("*.safetensors")):
        if tensor in read_header(f).tensors:
            return f
    raise AssertionError(f"{tensor} not in {folder}")


ETA = re.compile(r"\d\d:\d\d<\d\d:\d\d")  # tqdm's [elapsed<remaining]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
