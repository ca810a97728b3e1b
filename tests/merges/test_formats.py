"""apply and convert --format gguf|meta: the merge written straight into llama.cpp's and Meta's formats.

The reference for GGUF is the two-pass route users take today (merge to Hugging Face, then
convert that folder): its bytes must be ours. For Meta's layout it is transformers' conversion
rules inverted (tests/meta_helpers.py) applied to the Hugging Face result, and ``convert`` of
ours must give that result back.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from gguf_models import gguf_digests, specs, tiny_llama
from helpers import (
    GROUP,
    PRELUDE,
    apply_in_process,
    assert_states_equal,
    llama_config,
    load_state,
    run_cli,
    run_in_process,
    save_checkpoint,
)
from lora_factors import ALL, make_adapter
from meta_helpers import hf_state, hf_to_meta

import deltamerge.apply
from deltamerge import apply_delta
from deltamerge.conversion import convert
from deltamerge.integrity.checks import verify
from deltamerge.integrity.digest import TensorDigest, TensorHasher
from deltamerge.integrity.manifest import Role
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf
from deltamerge.tensor_spec import TensorSpec

gguf = pytest.importorskip("gguf")

RECORD = "deltamerge-result.json"


@pytest.fixture(scope="module")
def small_groups():
    """The plan's tensor groups (the hf result's shards, which GGUF's tensor order follows) small."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deltamerge.apply, "DEFAULT_SHARD_SIZE", GROUP)
        yield


@pytest.fixture(scope="module")
def lora(tmp_path_factory, sp_model, small_groups) -> tuple[Path, Path, Path]:
    """A bf16 LLaMA with a sentencepiece tokenizer and 2 key/value heads, a LoRA on every
    projection, and their merge as a Hugging Face folder (in shards of GROUP bytes)."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama(root / "base", sp_model, torch.bfloat16, kv_heads=2)
    adapter = make_adapter(base, torch.bfloat16, root / "adapter", r=4, lora_alpha=8, target_modules=ALL)
    (root / "hf").mkdir()
    apply_delta(base, adapter, root / "hf" / "model", max_shard_size=GROUP)
    return base, adapter, root / "hf" / "model"


def converted(hf: Path, out: Path, outtype: str | None, **kw) -> list[Path]:
    """What convert_hf_to_gguf.py writes for ``hf`` (the core, as tests/gguf/test_gguf.py checks it):
    the weight files read in name order, every tensor whole."""
    files = sorted(hf.glob("*.safetensors"))
    groups = [list(load_state_file(f)) for f in files]
    state = load_state(hf)
    plan = plan_gguf(hf, specs(state), outtype=outtype, hf_files=groups, dir_name=hf.name, **kw)
    out.mkdir(parents=True)
    with GGUFStreamWriter(plan, out) as writer:
        for name, t in state.items():
            writer.write_rows(name, 0, t.shape[0], t)
    return [out / f.name for f in plan.files]


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_lora_straight_to_gguf_equals_the_hf_merge_converted(tmp_path: Path, lora, outtype: str):
    base, adapter, hf = lora
    assert len(list(hf.glob("*.safetensors"))) > 2  # the converter's order depends on the files
    (tmp_path / "gguf").mkdir()
    out = tmp_path / "gguf" / "model"  # the same folder name as the hf result: it names the model
    result = apply_delta(base, adapter, out, format="gguf", outtype=outtype, block_size=3000, workers=2)
    expected = converted(hf, tmp_path / "converted", outtype)
    assert sorted(p.name for p in out.iterdir()) == sorted([expected[0].name, RECORD])
    assert (out / expected[0].name).read_bytes() == expected[0].read_bytes()
    assert result.shards == [expected[0].name] and result.format == "gguf"
    record = json.loads((out / RECORD).read_text())
    hf_record = json.loads((hf / RECORD).read_text())
    assert record["options"]["format"] == "gguf" and record["options"]["outtype"] == outtype
    assert record["result"]["tensors"] == gguf_digests(expected)  # the tensors as written
    assert record["result"]["model_digest"] == result.model_digest
    assert record["merged"] == hf_record["result"]  # the merge's tensors, before conversion
    assert result.merged_digest == hf_record["result"]["model_digest"] != result.model_digest


def test_gguf_splits_as_llama_cpp_does(tmp_path: Path, lora):
    base, adapter, hf = lora
    (tmp_path / "gguf").mkdir()
    out = tmp_path / "gguf" / "model"
    result = apply_delta(base, adapter, out, format="gguf", outtype="f16", max_shard_size="100KB")
    expected = converted(hf, tmp_path / "converted", "f16", split_max_size=100_000)
    assert len(expected) > 1 and result.shards == [p.name for p in expected]
    for path in expected:
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_transformers_loads_the_gguf_with_the_hf_results_logits(tmp_path: Path, sp_model, small_groups):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base", sp_model, torch.float32)
    adapter = make_adapter(base, torch.float32, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL)
    apply_delta(base, adapter, tmp_path / "hf")
    result = apply_delta(base, adapter, tmp_path / "gguf", format="gguf")  # f32: the result's dtype
    [name] = result.shards
    # tensors kept as they are take the merge's digests, q and k (reordered rows) are hashed
    record = json.loads((tmp_path / "gguf" / RECORD).read_text())
    assert record["result"]["tensors"] == gguf_digests([tmp_path / "gguf" / name])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([[1, 17, 42, 99, 5, 250, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


# ---------------------------------------------------------------------------------------------
# Meta's layout: 8 heads, so that 1, 2, 4 and 8 model-parallel shards all divide them

META_CONFIG = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 8,
               "intermediate_size": 176, "rms_norm_eps": 1e-5}


@pytest.fixture(scope="module")
def meta_lora(tmp_path_factory, sp_model) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("meta")
    base = save_checkpoint(hf_state("mha", seed=5, dtype=torch.float16), root / "base",
                           config=llama_config(96, "float16", **META_CONFIG))
    (base / "tokenizer.model").write_bytes(sp_model)
    adapter = make_adapter(base, torch.float16, root / "adapter", r=4, lora_alpha=8, target_modules=ALL)
    apply_delta(base, adapter, root / "hf")
    return base, adapter, root / "hf"


@pytest.mark.parametrize("mp", [1, 2, 4, 8])
def test_meta_shards_are_the_hf_results_under_transformers_rules_inverted(tmp_path: Path, meta_lora, mp: int):
    base, adapter, hf = meta_lora
    out = tmp_path / "meta"
    result = apply_delta(base, adapter, out, format="meta", mp=mp, block_size=2000, workers=2)
    names = [f"consolidated.{i:02d}.pth" for i in range(mp)]
    assert result.shards == names
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "params.json", "tokenizer.model", RECORD])
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    params = json.loads((out / "params.json").read_text())
    hf_state_ = load_state(hf)
    hf_to_meta(hf_state_, params, mp, tmp_path / "ref")
    written = {}
    for name in names:
        shard = torch.load(out / name, weights_only=True)
        expected = torch.load(tmp_path / "ref" / name, weights_only=True)
        del expected["rope.freqs"]
        assert_states_equal(shard, expected)
        torch.save({k: expected[k] for k in shard}, tmp_path / "ref" / name)  # torch.save's own bytes
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
        written |= {f"{name}:{k}": t for k, t in shard.items()}
    record = json.loads((out / RECORD).read_text())
    assert record["options"] == {**record["options"], "format": "meta", "mp": mp}
    digests = {name: _digest(t) for name, t in written.items()}
    assert Role.of(digests).to_json() == record["result"]
    assert record["merged"] == json.loads((hf / RECORD).read_text())["result"]
    # read back: convert gives the hf tensors, and verify checks the folder against its record
    convert(out, tmp_path / "back")
    assert_states_equal(load_state(tmp_path / "back"), hf_state_)
    assert verify(out, out).ok


def _digest(t: torch.Tensor) -> TensorDigest:
    hasher = TensorHasher(TensorSpec("t", t.dtype, tuple(t.shape)))
    hasher.update(t.contiguous())
    return hasher.digest()


def test_convert_meta_to_gguf_equals_convert_to_hf_then_converted(tmp_path: Path, sp_model):
    state = hf_state("mha", seed=6, dtype=torch.float16)
    params = {"dim": 64, "multiple_of": 16, "n_heads": 8, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": -1}
    hf_to_meta(state, params, 2, tmp_path / "LLaMA")
    (tmp_path / "LLaMA" / "tokenizer.model").write_bytes(sp_model)
    (tmp_path / "hf").mkdir()
    convert(tmp_path / "LLaMA", tmp_path / "hf" / "llama")
    proc = run_cli("convert", tmp_path / "LLaMA", tmp_path / "llama", "--format", "gguf", "-q")
    assert proc.returncode == 0, proc.stderr
    [expected] = converted(tmp_path / "hf" / "llama", tmp_path / "converted", None)
    assert (tmp_path / "llama" / expected.name).read_bytes() == expected.read_bytes()


# ---------------------------------------------------------------------------------------------
# Resume and refusals, through the command line

def _kept_offset(fmt: str, reference: Path, journal: Path) -> tuple[str, int]:
    """A file and a byte offset inside a tensor the killed run journaled (its first)."""
    first = json.loads(journal.read_text().splitlines()[1])
    name = next(iter(first["written"]))
    if fmt == "gguf":
        [path] = reference.glob("*.gguf")
        reader = gguf.GGUFReader(path)
        tensor = next(t for t in reader.tensors if t.name == name)
        return path.name, int(tensor.data_offset) + 3
    filename, meta = name.split(":")
    index = list(torch.load(reference / filename, weights_only=True)).index(meta)
    with zipfile.ZipFile(reference / filename) as archive:
        header = archive.getinfo(f"{filename.removesuffix('.pth')}/data/{index}").header_offset
    local = (reference / filename).read_bytes()[header : header + 30]
    name_length, extra_length = struct.unpack("<HH", local[26:30])  # the local header's own extra field
    return filename, header + 30 + name_length + extra_length + 3


FORMAT_OPTIONS = {"gguf": {"outtype": "q8_0"}, "meta": {"mp": 2}}


@pytest.fixture(scope="module")
def references(tmp_path_factory, lora, meta_lora, small_groups) -> dict[str, Path]:
    """Each format's uninterrupted result, in tensor groups as small as the killed runs' (PRELUDE)."""
    found = {}
    for fmt, options in FORMAT_OPTIONS.items():
        base, adapter, _ = lora if fmt == "gguf" else meta_lora
        found[fmt] = tmp_path_factory.mktemp(fmt) / "model"
        apply_delta(base, adapter, found[fmt], format=fmt, **options)
    return found


@pytest.mark.parametrize("fmt", ["gguf", "meta"])
@pytest.mark.parametrize("point", ["shard:2", "publish"])
def test_killed_run_resumes_to_the_same_bytes(tmp_path: Path, lora, meta_lora, references, small_groups,
                                              fmt, point):
    """A kept tensor group is read back and checked: one corrupted after the kill is redone."""
    base, adapter, _ = lora if fmt == "gguf" else meta_lora
    reference = references[fmt]
    options = [f"--{k}={v}" for k, v in FORMAT_OPTIONS[fmt].items()]
    args = ["apply", base, adapter, "--format", fmt, *options, "--block-size", "3000", "--workers", "2"]
    out = tmp_path / "model"
    killed = run_cli(*args, out, "-q", env={"DELTAMERGE_KILL_AT": point}, prelude=PRELUDE)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / ".model.deltamerge-partial"
    assert not out.exists() and partial.is_dir()
    if point == "shard:2":
        filename, offset = _kept_offset(fmt, reference, partial / "journal.jsonl")
        with open(partial / filename, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    resumed = run_in_process(*args, out, "--resume")  # small_groups: PRELUDE's groups, here
    assert resumed.returncode == 0, resumed.stderr
    assert "re-checked and kept" in resumed.stdout
    if point == "shard:2":
        assert re.search(r"redone: tensor '.*' digest differs from the journal", resumed.stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        if path.name != RECORD:
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    ours, theirs = (json.loads((f / RECORD).read_text()) for f in (out, reference))
    assert ours["result"] == theirs["result"] and ours["merged"] == theirs["merged"]
    assert not partial.exists()


@pytest.mark.parametrize("change,args,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, ["--format", "gguf"], "not GPT2LMHeadModel"),
    ({}, ["--format", "meta", "--mp", "8"], "--mp 8: 4 heads"),
    ({}, ["--outtype", "q8_0"], "--outtype .* needs --format gguf"),
    ({}, ["--format", "meta", "--max-shard-size", "1GB"], "does not apply to --format meta"),
])
def test_refusals_exit_2_with_nothing_at_out(tmp_path: Path, sp_model, change, args, message):
    base = tiny_llama(tmp_path / "base", sp_model, **change)
    delta = tiny_llama(tmp_path / "delta", sp_model, **change)
    code, err = apply_in_process(base, delta, tmp_path / "out", *args)
    assert code == 2, err
    assert re.search(message, err) and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]


def test_without_the_gguf_package_the_command_says_how_to_get_it(tmp_path: Path, lora):
    base, adapter, _ = lora
    proc = run_cli("apply", base, adapter, tmp_path / "out", "--format", "gguf",
                   prelude="import sys; sys.modules['gguf'] = None")
    assert proc.returncode == 2 and "pip install 'deltamerge[gguf]'" in proc.stderr
    assert not (tmp_path / "out").exists()



def test_gguf_package_warnings_are_one_line_each(capsys):
    """The gguf package logs through logging; the command line prints its warnings as its own."""
    import logging

    from deltamerge.cli.common import route_library_logs

    route_library_logs()
    route_library_logs()  # once per process, however often the command runs
    logging.getLogger("gguf.vocab").info("Setting special token type bos to 1")
    logging.getLogger("gguf.vocab").warning("Special token type pad, id 32000 out of range\nskipping")
    assert capsys.readouterr().err == "deltamerge: warning: Special token type pad, id 32000 out of range\n"
