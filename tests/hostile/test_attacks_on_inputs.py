"""Attacks by a hostile or careless input, each with the outcome deltamerge promises (issue 12).

One test per attack, named for it; its docstring says "attack: ... -> outcome: ...". Items 4, 5,
6, 8 and 9 of the issue, then the further attacks tried that were not handled before. (The
attacks on resume and on concurrent runs are in test_attacks_on_runs.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import (
    HIDDEN,
    assert_states_equal,
    llama_state,
    load_state,
    one_line,
    run_cli,
    save_checkpoint,
)
from hubserver import DEFAULT_TOKEN
from huggingface_hub import HfApi
from meta_helpers import hf_to_meta
from safetensors.torch import save_file

from deltamerge import apply_delta, make_delta, push_to_hub
from deltamerge.cli import main
from deltamerge.errors import FormatError, InputError, MismatchError
from deltamerge.kinds import patterns
from deltamerge.sources.torch_bin import load_torch_file

pytest_plugins = ["hub_fixtures"]  # the ``hub`` fixture: a local Hub on 127.0.0.1

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the Hub\n"
SHARD = "30000"  # several output shards for the tiny model
# As from a terminal: Ctrl-C raises KeyboardInterrupt (a background child would ignore SIGINT).
FOREGROUND = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"


def cli(*args: object) -> subprocess.CompletedProcess:
    """The command run through click in this process: the same error handling, no start-up."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)



def nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A base, an additive delta (no manifest) and a XOR delta with its manifest, made once."""
    root = tmp_path_factory.mktemp("adversarial")
    base = save_checkpoint(llama_state(0), root / "base")
    delta = save_checkpoint(llama_state(1), root / "delta")
    target = save_checkpoint(llama_state(2), root / "target")
    make_delta(base, target, root / "xor-delta", kind="xor")
    secret = root / "secret"
    secret.write_bytes(SECRET)
    return {"root": root, "base": base, "delta": delta, "target": target,
            "xor": root / "xor-delta", "secret": secret}


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


# --- 4. nothing from outside an input folder ---------------------------------------------------


def test_delta_tokenizer_symlinked_to_a_secret(tmp_path, world):
    """attack: the delta's tokenizer.model is a symlink to ~/secret, so that the secret is copied
    into OUT (and pushed with it) -> outcome: exit 2 naming tokenizer.model, nothing written."""
    delta = copy_folder(world["delta"], tmp_path / "delta")
    (delta / "tokenizer.model").symlink_to(world["secret"])
    out = tmp_path / "out"
    proc = cli("apply", world["base"], delta, out, "-q")
    one_line(proc, 2, "tokenizer.model", "symlink leading outside")
    nothing_written(out)


def test_base_config_symlinked_out_of_its_folder(tmp_path, world):
    """attack: the base's config.json is a symlink to a JSON file elsewhere (valid JSON, so no
    parse error stops it) -> outcome: exit 2 naming config.json, nothing written."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"api_key": "hunter2"}))
    base = copy_folder(world["base"], tmp_path / "base")
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(elsewhere)
    out = tmp_path / "out"
    one_line(cli("apply", base, world["delta"], out, "-q"), 2, "config.json", "outside")
    nothing_written(out)


def test_make_delta_target_tokenizer_symlinked_out(tmp_path, world):
    """attack: make-delta's TARGET has special_tokens_map.json linking out of it, to be copied
    into the published delta -> outcome: exit 2 naming it, no delta written."""
    target = copy_folder(world["target"], tmp_path / "target")
    (target / "special_tokens_map.json").unlink()
    (target / "special_tokens_map.json").symlink_to(world["secret"])
    out = tmp_path / "out"
    proc = cli("make-delta", world["base"], target, out, "-q")
    one_line(proc, 2, "special_tokens_map.json", "outside")
    nothing_written(out)


@pytest.mark.parametrize("linked", ["tokenizer.model", "special_tokens_map.json"])
def test_meta_tokenizer_files_in_the_parent_folder_symlinked_out(tmp_path, linked):
    """attack: Meta's layout takes tokenizer.model, and the tokenizer settings beside it, from
    the size folder's parent; there one is a symlink to a secret -> outcome: convert exits 2 at
    open naming it, nothing written."""
    params = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
              "vocab_size": -1}
    hf_to_meta(llama_state(0), params, 1, tmp_path / "LLaMA" / "7B")
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (tmp_path / "LLaMA" / "tokenizer.model").write_bytes(b"a tokenizer")
    (tmp_path / "LLaMA" / linked).unlink(missing_ok=True)
    (tmp_path / "LLaMA" / linked).symlink_to(secret)
    out = tmp_path / "out"
    proc = cli("convert", tmp_path / "LLaMA" / "7B", out, "-q")
    one_line(proc, 2, linked, "outside")
    nothing_written(out)


def test_xor_files_delta_payload_symlinked_out(tmp_path, world):
    """attack: an xor-files delta's added_tokens.json (written out XORed with nothing, i.e. as
    it is, when the base lacks one) links to a secret -> outcome: exit 2 naming it."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((world["base"] / "model.safetensors").read_bytes())
    delta = tmp_path / "delta"
    delta.mkdir()
    size = (world["base"] / "model.safetensors").stat().st_size
    (delta / "model.safetensors").write_bytes(bytes(size))  # the XOR of two equal files
    (delta / "added_tokens.json").symlink_to(world["secret"])
    out = tmp_path / "out"
    proc = cli("apply", base, delta, out, "--kind", "xor-files", "-q")
    one_line(proc, 2, "added_tokens.json", "outside")
    nothing_written(out)


def test_push_of_a_folder_with_a_symlink_to_a_secret(tmp_path, world, hub):
    """attack: the folder given to push holds tokenizer.model -> ~/secret -> outcome: exit 2
    naming it, before any request reaches the (local) Hub."""
    folder = copy_folder(world["base"], tmp_path / "model")
    (folder / "tokenizer.model").symlink_to(world["secret"])
    one_line(cli("push", folder, "someone/model"), 2, "tokenizer.model", "outside")
    assert hub.log == []


def test_push_of_a_folder_with_a_symlinked_subfolder_leading_out(tmp_path, world, hub):
    """attack: push's folder holds extra -> ~/.ssh-like folder, whose files would be uploaded
    (or silently dropped) -> outcome: exit 2 naming the link, no request."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "id_rsa").write_bytes(SECRET)
    folder = copy_folder(world["base"], tmp_path / "model")
    (folder / "extra").symlink_to(keys)
    one_line(cli("push", folder, "someone/model"), 2, "extra", "outside")
    assert hub.log == []


def test_links_inside_the_folder_and_into_its_own_hub_blobs_are_copied(tmp_path, world):
    """attack (none: the legitimate layouts): a link to a file beside it, and a Hub cache
    snapshot whose files link into ``../../blobs/`` of the same repository -> outcome: applied,
    the linked files copied into OUT by content; a link into another cached repo is refused."""
    repo = tmp_path / "hub" / "models--someone--delta"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in world["delta"].iterdir():
        (repo / "blobs" / f"blob-{path.name}").write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(f"../../blobs/blob-{path.name}")
    (snapshot / "tokenizer.model").write_bytes(b"tokenizer bytes")
    (snapshot / "added_tokens.json").symlink_to("special_tokens_map.json")  # inside the folder
    out = tmp_path / "out"
    proc = cli("apply", world["base"], snapshot, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokenizer.model").read_bytes() == b"tokenizer bytes"
    assert not (out / "added_tokens.json").is_symlink()
    assert (out / "added_tokens.json").read_text() == (world["delta"] / "special_tokens_map.json").read_text()
    assert_states_equal(load_state(out), load_state(run_out(tmp_path, world)))

    other = tmp_path / "hub" / "models--attacker--x" / "blobs"
    other.mkdir(parents=True)
    (other / "beef").write_bytes(SECRET)
    (snapshot / "tokenizer.model").unlink()
    (snapshot / "tokenizer.model").symlink_to(other / "beef")
    proc = cli("apply", world["base"], snapshot, tmp_path / "out2", "-q")
    one_line(proc, 2, "tokenizer.model", "outside")


def run_out(tmp_path: Path, world) -> Path:
    out = tmp_path / "reference"
    proc = cli("apply", world["base"], world["delta"], out, "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def test_fifo_and_device_as_non_weight_files_are_skipped(tmp_path, world):
    """attack: tokenizer.model is a FIFO (a copy would block for ever) and added_tokens.json a
    symlink to /dev/zero (endless) -> outcome: both skipped, the merge succeeds without them."""
    delta = copy_folder(world["delta"], tmp_path / "delta")
    os.mkfifo(delta / "tokenizer.model")
    (delta / "added_tokens.json").symlink_to("/dev/zero")
    out = tmp_path / "out"
    proc = cli("apply", world["base"], delta, out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "tokenizer.model").exists() and not (out / "added_tokens.json").exists()


def test_weight_file_symlinked_to_another_disk_is_read(tmp_path, world):
    """attack (none: a documented use): the base's model.safetensors links to a file on another
    disk -> outcome: read, since weight files are parsed and never copied; the result is exact."""
    disk = tmp_path / "other-disk"
    disk.mkdir()
    (disk / "llama.safetensors").write_bytes((world["base"] / "model.safetensors").read_bytes())
    base = copy_folder(world["base"], tmp_path / "base")
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(disk / "llama.safetensors")
    out = tmp_path / "out"
    proc = cli("apply", base, world["delta"], out, "-q")
    assert proc.returncode == 0, proc.stderr
    assert_states_equal(load_state(out), load_state(run_out(tmp_path, world)))


# --- 5. adapters cannot crash or hang the tool ----------------------------------------------


def lora_adapter(folder: Path, **config: object) -> Path:
    """A plain LoRA adapter on q_proj of the tiny LLaMA, as peft saves one."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i in range(2):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=g).to(torch.float16)
        tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, 4, generator=g).to(torch.float16)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]} | config
    ))
    return folder


def test_adapter_with_an_invalid_regular_expression(tmp_path, world):
    """attack: rank_pattern holds a key that is not a regular expression ("q_proj[") -> outcome:
    one line naming the file and the key, exit 2 (was a 60-line traceback, exit 1)."""
    adapter = lora_adapter(tmp_path / "adapter", rank_pattern={"q_proj[": 4})
    out = tmp_path / "out"
    proc = cli("apply", world["base"], adapter, out, "-q")
    one_line(proc, 2, "adapter_config.json", "rank_pattern", "q_proj[", "not a valid regular")
    nothing_written(out)


def test_adapter_with_a_catastrophically_backtracking_pattern(tmp_path, world, monkeypatch):
    """attack: alpha_pattern holds (.|.)*(.|.)*(.|.)*Z, which takes Python's re years to fail on
    a module name -> outcome: refused once the matching outlasts its deadline (1 s here), exit 2
    naming the key; nothing written, no process left running."""
    adapter = lora_adapter(tmp_path / "adapter", alpha_pattern={"(.|.)*(.|.)*(.|.)*Z": 16})
    out = tmp_path / "out"
    monkeypatch.setattr(patterns, "MATCH_SECONDS", 1)
    proc = cli("apply", world["base"], adapter, out, "-q")
    one_line(proc, 2, "alpha_pattern", "(.|.)*(.|.)*(.|.)*Z", "backtracks")
    nothing_written(out)


def test_adapter_patterns_that_are_fine_still_apply(tmp_path, world):
    """attack (none: the control): rank and alpha patterns peft accepts -> outcome: merged with
    the pattern's values (alpha 2 on layer 1 only, as peft's first-match rule gives)."""
    adapter = lora_adapter(tmp_path / "adapter", rank_pattern={"q_proj": 4},
                           alpha_pattern={"layers\\.1\\..*q_proj": 2})
    out = tmp_path / "out"
    proc = cli("apply", world["base"], adapter, out, "-q", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    merged, base = load_state(out), load_state(world["base"])
    factors = load_state(adapter)
    for i, scale in ((0, 8 / 4), (1, 2 / 4)):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        product = factors[f"{key}.lora_B.weight"].float() @ factors[f"{key}.lora_A.weight"].float()
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        expected = base[name].float() + product * scale
        assert torch.equal(merged[name], expected), name


# --- 6. refuse at open what cannot be read ----------------------------------------------------


def bin_delta(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    save_checkpoint(llama_state(1), folder, "bin")
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_bin_tensor_without_storage(tmp_path, world):
    """attack: a .bin delta whose tensor is on device "meta" (a shape and no bytes, saved from a
    model never materialized) -> outcome: exit 2 at open naming file and tensor, nothing
    written (was: a failure mid-run, advising a --resume that could never help)."""
    state = llama_state(1)
    state["model.layers.1.mlp.up_proj.weight"] = torch.empty(
        state["model.layers.1.mlp.up_proj.weight"].shape, dtype=torch.float16, device="meta")
    delta = bin_delta(tmp_path / "delta", state)
    out = tmp_path / "out"
    proc = cli("apply", world["base"], delta, out, "-q", "--max-shard-size", SHARD)
    one_line(proc, 2, "pytorch_model.bin", "model.layers.1.mlp.up_proj.weight", "no data")
    nothing_written(out)


def rezip(src: Path, dst: Path, change, compression: int = zipfile.ZIP_STORED) -> None:
    """``src`` archive rewritten member by member, ``change(name, data)`` deciding each's bytes."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compression) as w:
        for info in z.infolist():
            w.writestr(info.filename, change(info.filename, z.read(info.filename)))


def test_bin_storage_record_cut_short(tmp_path, world):
    """attack: a .bin whose first storage record is cut to 40 bytes, the archive rebuilt around
    it (torch's mapped load then reads on into the next members without a word) -> outcome:
    exit 2 at open naming the record, nothing written."""
    delta = bin_delta(tmp_path / "delta", llama_state(1))
    good = tmp_path / "good.bin"
    (delta / "pytorch_model.bin").rename(good)
    rezip(good, delta / "pytorch_model.bin", lambda n, d: d[:40] if n.endswith("/data/0") else d)
    out = tmp_path / "out"
    proc = cli("apply", world["base"], delta, out, "-q")
    one_line(proc, 2, "pytorch_model.bin", "data/0", "holds 40 bytes but the pickle declares")
    nothing_written(out)


def test_bin_with_compressed_members(tmp_path, world):
    """attack: the same archive deflate-compressed (torch's mapped load would read compressed
    bytes as the tensor's) -> outcome: exit 2 at open naming a compressed member."""
    delta = bin_delta(tmp_path / "delta", llama_state(1))
    good = tmp_path / "good.bin"
    (delta / "pytorch_model.bin").rename(good)
    rezip(good, delta / "pytorch_model.bin", lambda n, d: d, zipfile.ZIP_DEFLATED)
    out = tmp_path / "out"
    one_line(cli("apply", world["base"], delta, out, "-q"), 2, "pytorch_model.bin", "is compressed")
    nothing_written(out)


def test_bin_zip_bomb_pickle(tmp_path, world):
    """attack: a 200 KB .bin whose data.pkl inflates to 256 MB of zeros (torch reads the pickle
    whole: a few MB of file can cost gigabytes) -> outcome: refused from the zip directory,
    before torch reads a byte of it, exit 2."""
    delta = bin_delta(tmp_path / "delta", llama_state(1))
    with zipfile.ZipFile(delta / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as w:
        with w.open("archive/data.pkl", "w", force_zip64=True) as f:
            for _ in range(16):
                f.write(bytes(1 << 24))
    assert (delta / "pytorch_model.bin").stat().st_size < 1 << 20
    out = tmp_path / "out"
    one_line(cli("apply", world["base"], delta, out, "-q"), 2, "archive/data.pkl", "is compressed")
    nothing_written(out)


def test_bin_whose_zip_directory_claims_a_future_zip_version(tmp_path):
    """attack (found by the fuzzed readers): a .bin whose central directory says "needs zip 6.4", which
    Python's zipfile answers with NotImplementedError -> outcome: a FormatError naming the file,
    as for any damaged archive (the new pre-load directory check had let it escape)."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.zeros(4, dtype=torch.float16)}, path)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 6:central + 8] = (64).to_bytes(2, "little")  # "version needed to extract"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not a readable torch archive"):
        load_torch_file(path)


def test_meta_pth_tensor_without_storage(tmp_path):
    """attack: a Meta consolidated.00.pth holding a "meta" tensor -> outcome: convert exits 2
    at open naming the shard and tensor, nothing written."""
    params = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
              "vocab_size": -1}
    folder = tmp_path / "7B"
    hf_to_meta(llama_state(0), params, 1, folder)
    shard = torch.load(folder / "consolidated.00.pth", weights_only=True)
    shard["norm.weight"] = torch.empty(shard["norm.weight"].shape, device="meta")
    torch.save(shard, folder / "consolidated.00.pth")
    (folder / "checklist.chk").unlink()
    out = tmp_path / "out"
    proc = cli("convert", folder, out, "-q")
    one_line(proc, 2, "consolidated.00.pth", "norm.weight", "no data")
    nothing_written(out)


# --- 8. exit statuses as documented -------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "delta", "out-parent"])
def test_file_given_where_a_folder_is_expected(tmp_path, world, which):
    """attack: a weight file as BASE or DELTA, or OUT inside a file -> outcome: exit 2 with one
    line saying it is a file, not a folder (was: "Not a directory", exit 1)."""
    base, delta, out = world["base"], world["delta"], tmp_path / "out"
    if which == "base":
        base = base / "model.safetensors"
    elif which == "delta":
        delta = delta / "model.safetensors"
    else:
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "out"
    one_line(cli("apply", base, delta, out, "-q"), 2, "a file, not a folder")
    assert not (tmp_path / "out").exists()


def test_push_of_a_file(tmp_path):
    """attack: push given a file instead of a folder -> outcome: exit 2, one line."""
    (tmp_path / "model.safetensors").write_bytes(b"x")
    one_line(cli("push", tmp_path / "model.safetensors", "someone/model"), 2,
             "a file, not a folder")


@pytest.mark.parametrize("case,code", [("bad-input", 2), ("bad-verification", 1)])
def test_debug_shows_the_traceback_and_keeps_the_status(tmp_path, world, case, code):
    """attack: --debug on a failing command -> outcome: the traceback, then the one-line error,
    and the documented status (was: 1 for every error, the status of an uncaught exception)."""
    if case == "bad-input":
        args = ("apply", world["base"], world["delta"] / "missing", tmp_path / "out")
    else:
        other = save_checkpoint(llama_state(5), tmp_path / "other")
        args = ("verify", other, "-m", world["xor"], "--role", "base", "-q")
    proc = cli("--debug", *args)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("deltamerge: error: ")


def test_ctrl_c_in_a_merge(tmp_path, world):
    """attack: Ctrl-C in the middle of a merge -> outcome: exit 130, as a shell reports a
    process SIGINT killed (was: 1), the partial folder kept for --resume. (SIGTERM, 143: in
    test_resume.py.)"""
    out = tmp_path / "out"
    proc = run_cli("apply", world["base"], world["delta"], out, "--max-shard-size", SHARD,
                   "--block-size", "4096", "--workers", "1", "-q",
                   env={"DELTAMERGE_KILL_AT": "block:5", "DELTAMERGE_KILL_SIGNAL": "INT"},
                   prelude=FOREGROUND)
    one_line(proc, 130, "interrupted", "--resume")
    assert not out.exists() and (tmp_path / ".out.deltamerge-partial").is_dir()


def test_ctrl_c_in_make_delta(tmp_path, world):
    """attack: Ctrl-C while make-delta works -> outcome: 130 too, its partial delta kept for
    --resume."""
    out = tmp_path / "out"
    proc = run_cli("make-delta", world["base"], world["target"], out, "--block-size", "4096", "-q",
                   env={"DELTAMERGE_KILL_AT": "block:3", "DELTAMERGE_KILL_SIGNAL": "INT"},
                   prelude=FOREGROUND)
    one_line(proc, 130, "interrupted", "--resume")
    assert not out.exists() and (tmp_path / ".out.deltamerge-partial").is_dir()


def test_reader_of_stdout_goes_away(world):
    """attack: `deltamerge inspect X | head -2`, the reader gone before the output is written
    -> outcome: no word on stderr, exit 141 as git and coreutils give (was: "error: Broken
    pipe", exit 1, one time in three)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "deltamerge", "inspect", str(world["base"]), "--no-digest"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    child.stdout.close()  # before the child can write a byte: deterministic, not a race
    err = child.stderr.read()
    child.wait(timeout=120)
    assert child.returncode == 128 + signal.SIGPIPE, err
    assert err == b""


# --- 9. mistakes caught before the long work ----------------------------------------------------


def test_kind_contradicting_the_manifest(tmp_path, world):
    """attack: --kind add on a delta whose deltamerge.json says xor (the result would be noise)
    -> outcome: refused up front, exit 2, naming both kinds."""
    out = tmp_path / "out"
    proc = cli("apply", world["base"], world["xor"], out, "--kind", "add", "-q")
    one_line(proc, 2, "--kind add", "deltamerge.json", "xor")
    nothing_written(out)


def test_kind_contradicting_an_adapter_config(tmp_path, world):
    """attack: --kind add on a PEFT LoRA adapter folder -> outcome: exit 2 naming both kinds."""
    adapter = lora_adapter(tmp_path / "adapter")
    proc = cli("apply", world["base"], adapter, tmp_path / "out", "--kind", "xor", "-q")
    one_line(proc, 2, "--kind xor", "adapter_config.json", "lora")


def test_base_and_delta_swapped(tmp_path, world):
    """attack: `apply DELTA BASE OUT`, the arguments swapped -> outcome: exit 2 saying BASE holds
    a deltamerge.json and asking whether they were swapped."""
    proc = cli("apply", world["xor"], world["base"], tmp_path / "out", "-q")
    one_line(proc, 2, "BASE holds a deltamerge.json", "did you swap BASE and DELTA?")


def test_base_in_another_dtype_than_the_publisher_s(tmp_path, world):
    """attack: a bf16 copy of the fp16 base the delta was made against -> outcome: exit 2
    before any work: "BASE is bfloat16, the delta was made against a float16 base" (was:
    "does not match the publisher's base" at the first tensor, exit 1)."""
    state = {n: t.to(torch.bfloat16) for n, t in llama_state(0).items()}
    base = save_checkpoint(state, tmp_path / "base-bf16")
    out = tmp_path / "out"
    proc = cli("apply", base, world["xor"], out, "-q")
    one_line(proc, 2, "BASE is bfloat16", "made against a float16 base", "convert it")
    nothing_written(out)


def test_hub_inputs_in_another_dtype_or_swapped(hub, tmp_path, world):
    """attack: the same two mistakes with Hub repos (a bf16 base repo; the delta repo given as
    BASE) -> outcome: refused from the small files and remote headers, before any weight is
    downloaded."""
    api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
    bf16 = save_checkpoint({n: t.to(torch.bfloat16) for n, t in llama_state(0).items()},
                           tmp_path / "base-bf16")
    push_to_hub(bf16, "alice/base-bf16", api=api)
    push_to_hub(world["xor"], "alice/xor-delta", api=api)
    hub.log.clear()
    with pytest.raises(MismatchError, match="BASE is bfloat16, the delta was made against a float16"):
        apply_delta("alice/base-bf16", "alice/xor-delta", tmp_path / "out", hub={"api": api})
    with pytest.raises(InputError, match="did you swap BASE and DELTA"):
        apply_delta("alice/xor-delta", "alice/base-bf16", tmp_path / "out", hub={"api": api})
    assert [e for e in hub.requests_to("/lfs-objects/", "GET") if e[2] != 206] == []
    assert not (tmp_path / "out").exists()


def killed_run(tmp_path: Path, world, *extra: str) -> Path:
    out = tmp_path / "out"
    killed = run_cli("apply", world["base"], world["delta"], out, "--max-shard-size", SHARD, "-q",
                     *extra, env={"DELTAMERGE_KILL_AT": "shard:2"})
    assert killed.returncode == -9, killed.stderr
    return out


def test_resume_with_another_dtype(tmp_path, world):
    """attack: --resume with --dtype bfloat16 of a run started without it -> outcome: exit 2
    saying which option differs, then and now (was: "other inputs or options")."""
    out = killed_run(tmp_path, world)
    proc = cli("apply", world["base"], world["delta"], out, "--max-shard-size", SHARD, "-q",
                   "--dtype", "bfloat16", "--resume")
    one_line(proc, 2, "other inputs or options", "--dtype differs (not given then, bfloat16 now)")


def test_resume_after_an_input_file_changed(tmp_path, world):
    """attack: an input file rewritten between the killed run and its --resume -> outcome:
    exit 2 naming the file that changed."""
    delta = copy_folder(world["delta"], tmp_path / "delta")
    out = tmp_path / "out"
    args = ("apply", world["base"], delta, out, "--max-shard-size", SHARD, "-q")
    assert run_cli(*args, env={"DELTAMERGE_KILL_AT": "shard:2"}).returncode == -9
    os.utime(delta / "model.safetensors", ns=(1, 1))
    proc = cli(*args, "--resume")
    one_line(proc, 2, f"input file {delta / 'model.safetensors'} changed")


# --- further attacks, not handled before ---------------------------------------------------------


def test_tensor_names_holding_terminal_escape_sequences(tmp_path, world):
    """attack: a checkpoint whose tensor name holds ESC ] 0 ; ... BEL and ESC [ 2 J (retitle and
    clear the terminal of whoever inspects or diffs it) -> outcome: printed escaped (\\x1b),
    never raw, by inspect and diff."""
    state = llama_state(0)
    state["model.\x1b]0;owned\x07\x1b[2Jx"] = torch.zeros(2, dtype=torch.float16)
    folder = save_checkpoint(state, tmp_path / "escapes")
    shown = cli("inspect", folder, "--no-digest", "-q")
    assert shown.returncode == 0, shown.stderr
    differ = cli("diff", folder, world["base"], "-q")
    assert differ.returncode == 1, differ.stderr
    for proc in (shown, differ):
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
        assert "model.\\x1b]0;owned\\x07\\x1b[2Jx" in proc.stdout


def test_error_message_naming_a_path_with_a_newline(tmp_path, world):
    """attack: a path holding a newline (and an escape) in an error message, which was cut at
    the newline (the rest, and the advice, lost) -> outcome: one whole line, escaped."""
    proc = cli("apply", world["base"], tmp_path / "del\nta\x1b[2J", tmp_path / "out")
    line = one_line(proc, 2, "del\\nta\\x1b[2J: no such folder (delta)")
    assert "\x1b" not in line


def test_out_where_nothing_can_be_written(tmp_path, world):
    """attack: OUT on a read-only file system (or, not as root, in a folder without write
    permission) -> outcome: exit 2 before any work, saying why (was: exit 1 after planning;
    for Hub inputs, after the downloads)."""
    target = tmp_path / "locked"
    target.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(target)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        why = "read-only file system"
    else:
        target.chmod(0o555)
        why = "permission denied"
    try:
        one_line(cli("apply", world["base"], world["delta"], target / "out", "-q"), 2,
                 "cannot write out there", why)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(target)], check=False)
        else:
            target.chmod(0o755)


@pytest.mark.parametrize("name", [".", ".."])
def test_out_named_dot_or_dot_dot(tmp_path, world, monkeypatch, name):
    """attack: OUT given as . (or ..) with --force: the whole merge ran, then renaming the
    current folder failed ("Device or resource busy", exit 1) -> outcome: exit 2 up front."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious").write_text("kept")
    monkeypatch.chdir(work)
    one_line(cli("apply", world["base"], world["delta"], name, "--force", "-q"), 2,
             "OUT must name the folder to create")
    assert (work / "precious").read_text() == "kept"


def test_base_given_again_as_the_delta(tmp_path, world):
    """attack: `apply base base out` (or the same folder spelled ./base/../base): the base
    "applied" to itself, every weight doubled, exit 0 -> outcome: exit 2, nothing written."""
    spelled = world["base"] / ".." / world["base"].name
    out = tmp_path / "out"
    one_line(cli("apply", world["base"], spelled, out, "-q"), 2, "is BASE itself")
    nothing_written(out)


def test_revision_that_climbs_out_of_the_hub_cache(tmp_path, world, hub):
    """attack: a revision `owner/name@../../../../x`, which offline names the file the cache's
    refs/ lookup reads (its content then taken as a snapshot folder) -> outcome: exit 2, not a
    valid revision, no file read."""
    proc = cli("apply", world["base"], "owner/name@../../../../x", tmp_path / "out")
    one_line(proc, 2, "not a valid revision")
    assert hub.log == []


def test_cache_ref_naming_a_path_instead_of_a_commit(tmp_path, world):
    """attack: offline, the cache's refs/main holds "../../../elsewhere", not a commit (the
    snapshot folder would then be a folder outside the cache) -> outcome: exit 2, one line."""
    refs = tmp_path / "hf" / "hub" / "models--owner--name" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("../../../elsewhere")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("apply", world["base"], "owner/name", tmp_path / "out", env=env)
    one_line(proc, 2, "not a commit")


def test_invalid_repo_id(tmp_path, world, hub):
    """attack: a repo id huggingface_hub rejects (`owner/..`) -> outcome: its one-line
    validation message, exit 2, no request (was: a raw HFValidationError traceback, exit 1,
    from the overlap check's cache path)."""
    one_line(cli("apply", world["base"], "owner/..", tmp_path / "out"), 2, "owner/..",
             "Repo id must")
    assert hub.log == []
