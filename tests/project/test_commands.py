"""The checksum commands: checksum, verify, inspect and diff, as the library and as the CLI.

The digests are recomputed here from docs/manifest.md's definition, independently of digest.py,
so the documented algorithm and the code cannot drift apart.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import (
    ALGORITHMS,
    DTYPE_NAMES,
    ROOT,
    documented_digests,
    fine_tune,
    flip_bit,
    llama_state,
    run_in_process,
    save_checkpoint,
    with_manifest_format,
)

from deltamerge import InputError, apply_delta, make_delta
from deltamerge.cli import main
from deltamerge.errors import FormatError
from deltamerge.integrity.checks import checksum, diff, inspect, load_expected, verify

TAMPERED = "model.layers.0.self_attn.v_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A base, a fine-tune, the delta between them and the result of applying it (made once)."""
    root = tmp_path_factory.mktemp("commands")
    base_state = llama_state(0)
    target_state = fine_tune(base_state, 3)
    base = save_checkpoint(base_state, root / "base")
    target = save_checkpoint(target_state, root / "target")
    delta = root / "delta"
    make_delta(base, target, delta)
    out = root / "out"
    apply_delta(base, delta, out)
    return {"root": root, "base": base, "target": target, "delta": delta, "out": out,
            "base_state": base_state, "target_state": target_state}


def invoke(*args: object) -> Result:
    """The CLI in this process, click's Result (``run_in_process`` for failures: a process's answer)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(proc, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("deltamerge: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- checksum -------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_checksum_follows_the_documented_algorithm(world, algorithm):
    expected_model, expected_tensors = documented_digests(world["base_state"], algorithm)
    result = checksum(world["base"], algorithm=algorithm)
    assert result.model_digest == expected_model and result.algorithm == algorithm
    assert {n: d.hexdigest for n, d in result.tensors.items()} == expected_tensors
    digest, tensors = result  # unpacks as (model_digest, tensors)
    assert digest == expected_model and tensors is result.tensors
    if algorithm == "blake3":
        assert checksum(world["base"]) == result  # the default


def test_checksum_covers_odd_shapes_and_dtypes(tmp_path):
    state = {
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "wide": torch.randn(2, 3000),
    }
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file(state, tmp_path / "m" / "model.safetensors")
    expected, _ = documented_digests(state)
    assert checksum(tmp_path / "m").model_digest == expected
    # Blocks smaller than one row, and blocks of several rows, give the same digests.
    assert checksum(tmp_path / "m", block_bytes=7).model_digest == expected
    assert checksum(tmp_path / "m", block_bytes=10_000).model_digest == expected


WORKED_EXAMPLE = {  # docs/manifest.md: tensor w, tensor a.scale, model digest
    "blake3": ("83376e7b4f6f582d", "58549620097146b5",
               "e3467601e1ceea02660e0ae8e4671f3f949cc7d0a8b2883a55f61e75ae200f24"),
    "sha256": ("b9c80b5adeca4507", "195f58bc6d6b7b36",
               "324c5c9e004c7b44ac5e59ad9ec04a26aa6a85f563ae026ea24d6c9c59ff2dae"),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_worked_example_of_docs_manifest_md(tmp_path, algorithm):
    from safetensors.torch import save_file

    (tmp_path / "ex").mkdir()
    save_file({"w": torch.tensor([1.0, 2.0]), "a.scale": torch.tensor(0.5, dtype=torch.float16)},
              tmp_path / "ex" / "model.safetensors")
    result = checksum(tmp_path / "ex", algorithm=algorithm)
    w, scale, model = WORKED_EXAMPLE[algorithm]
    assert result.tensors["w"].hexdigest.startswith(w)
    assert result.tensors["a.scale"].hexdigest.startswith(scale)
    assert result.model_digest == model


def test_block_size_does_not_change_digests(world):
    assert checksum(world["base"], block_bytes=1000) == checksum(world["base"])


@pytest.mark.parametrize("algorithm, version", [("blake3", 2), ("sha256", 1)])
def test_checksum_cli_prints_the_digest_and_writes_a_manifest_verify_accepts(
    world, tmp_path, algorithm, version
):
    """docs/manifest.md: `DIGEST  DIR`; --output writes format 2 (blake3) or 1 (sha256)."""
    digests = tmp_path / "base.digests.json"
    proc = invoke("checksum", world["base"], "--algorithm", algorithm, "--output", digests)
    assert proc.exit_code == 0, proc.output
    expected, tensors = documented_digests(world["base_state"], algorithm)
    assert proc.stdout == f"{expected}  {world['base']}\n"
    written = json.loads(digests.read_text())
    assert written["format"] == "deltamerge-checksums" and written["format_version"] == version
    assert written["model_digest"] == expected
    assert {n: d[algorithm] for n, d in written["tensors"].items()} == tensors
    # The same weights as .bin shards pass against it: digests are of content, not files.
    as_bin = save_checkpoint(world["base_state"], tmp_path / "bin", fmt="bin", shard_bytes=50_000)
    report = verify(as_bin, digests)
    assert report.ok and report.algorithm == algorithm
    proc = run_in_process("verify", "-q", world["target"], "--manifest", digests)
    one_line_error(proc, 1, "21 tensor(s) do not match")
    other = "sha256" if algorithm == "blake3" else "blake3"
    proc = run_in_process("verify", "-q", as_bin, "--manifest", digests, "--algorithm", other)
    one_line_error(proc, 2, f"holds {algorithm} digests, not {other}")


# -- verify ---------------------------------------------------------------------------------
def test_verify_passes_on_a_good_result_with_either_manifest(world):
    for manifest in (world["delta"] / "deltamerge.json", world["out"] / "deltamerge-result.json",
                     world["delta"], world["out"]):
        report = verify(world["out"], manifest)
        assert report.ok, manifest
        assert report.matched == report.tensors == 21
        assert report.model_digest == report.expected_digest
    assert verify(world["base"], world["delta"] / "deltamerge.json", role="base").ok


def test_format1_manifests_and_old_result_records_still_verify(world, tmp_path):
    """Digests made before format 2 (sha256) are checked in sha256, by the CLI too."""
    delta = tmp_path / "delta"
    shutil.copytree(world["delta"], delta)
    with_manifest_format(1, delta, world["base"], tmp_path / "scratch")
    manifest = delta / "deltamerge.json"
    assert json.loads(manifest.read_text())["format_version"] == 1
    for role, folder in (("result", world["out"]), ("base", world["base"])):
        report = verify(folder, manifest, role)
        assert report.ok and report.algorithm == "sha256" and report.matched == 21
    proc = invoke("verify", world["out"], "--manifest", manifest, "--algorithm", "sha256")
    assert proc.exit_code == 0, proc.output
    sha = json.loads(manifest.read_text())["result"]["model_digest"]
    assert f"model digest sha256 {sha}" in proc.stdout
    # A deltamerge-result.json from before format 2: no "algorithm", sha256 digests.
    record = json.loads((world["out"] / "deltamerge-result.json").read_text())
    assert record["algorithm"] == "blake3"
    del record["algorithm"]
    record["result"] = json.loads(manifest.read_text())["result"]
    old = tmp_path / "deltamerge-result.json"
    old.write_text(json.dumps(record))
    assert verify(world["out"], old).ok


def test_verify_cli_passes_then_lists_the_tampered_tensor(world, tmp_path):
    manifest = world["delta"] / "deltamerge.json"
    proc = invoke("verify", world["out"], "--manifest", manifest)
    assert proc.exit_code == 0, proc.output
    assert f"OK  {world['out']} matches the result" in proc.stdout

    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    flip_bit(out / "model.safetensors", TAMPERED)
    proc = run_in_process("verify", "-q", out, "--manifest", manifest)
    one_line_error(proc, 1, str(out), "1 tensor(s) do not match", "20 of 21 matched")
    listed = proc.stdout.strip().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"differs  {TAMPERED}: content: blake3")


def test_verify_reports_missing_extra_and_changed_tensors(world, tmp_path):
    state = dict(world["target_state"])
    state.pop("model.norm.weight")
    state["extra.bias"] = torch.zeros(3, dtype=torch.float16)
    state["lm_head.weight"] = state["lm_head.weight"].float()
    folder = save_checkpoint(state, tmp_path / "odd")
    report = verify(folder, world["delta"] / "deltamerge.json")
    assert not report.ok
    assert report.missing == ["model.norm.weight"]
    assert report.extra == ["extra.bias"]
    assert [(m.name, m.reason) for m in report.differ] != []
    reasons = {m.name: m.reason for m in report.differ}
    assert reasons["lm_head.weight"] == "dtype"
    assert report.failures == 1 + 1 + len(report.differ)
    assert report.to_json()["ok"] is False


def test_verify_wrong_base_lists_every_tensor(world, tmp_path):
    other = save_checkpoint(llama_state(1), tmp_path / "other")
    report = verify(other, world["delta"] / "deltamerge.json", role="base")
    assert len(report.differ) == 21 and report.matched == 0


def test_manifest_sources_and_roles(world, tmp_path):
    result_record = world["out"] / "deltamerge-result.json"
    with pytest.raises(InputError, match="no base role"):
        load_expected(result_record, role="base")
    with pytest.raises(InputError, match="role must be one of"):
        load_expected(world["delta"] / "deltamerge.json", role="target")
    with pytest.raises(FormatError, match="not a deltamerge.json"):
        load_expected(world["base"] / "config.json")
    with pytest.raises(InputError, match="holds neither"):
        load_expected(world["base"])


def test_verify_cli_refuses_a_file_that_is_not_a_manifest(world):
    proc = run_in_process("verify", world["out"], "--manifest", world["base"] / "config.json")
    one_line_error(proc, 2, "config.json", "not a deltamerge.json")


# -- inspect --------------------------------------------------------------------------------
def test_inspect_json_fields(world, tmp_path):
    state = llama_state(0, inv_freq=True)
    folder = save_checkpoint(state, tmp_path / "bin", fmt="bin", shard_bytes=60_000)
    proc = invoke("inspect", "--json", folder)
    assert proc.exit_code == 0, proc.output
    r = json.loads(proc.stdout)
    assert r["format"] == "bin"
    assert r["index"] == "pytorch_model.bin.index.json"
    weight_map = json.loads((folder / r["index"]).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert [s["file"] for s in r["shards"]] == files
    for s in r["shards"]:
        assert s["size"] == (folder / s["file"]).stat().st_size
        assert s["tensors"] == sum(1 for f in weight_map.values() if f == s["file"])
    assert r["dtypes"] == {
        "F16": {"tensors": 21, "parameters": sum(t.numel() for n, t in state.items()
                                                  if t.dtype == torch.float16)},
        "F32": {"tensors": 2, "parameters": 16},
    }
    assert r["parameters"] == sum(t.numel() for t in state.values())
    assert r["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    table = {t["name"]: t for t in r["tensors"]}
    assert sorted(table) == sorted(state)
    for name, t in state.items():
        assert table[name]["dtype"] == DTYPE_NAMES[t.dtype]
        assert table[name]["shape"] == list(t.shape)
        assert table[name]["file"] == weight_map[name]
    assert r["model_digest"] == documented_digests(state)[0] and r["algorithm"] == "blake3"


def test_inspect_without_digest_reads_headers_only(world):
    report = inspect(world["base"], digest=False)
    assert report.model_digest is None and report.format == "safetensors" and report.index is None
    assert report.parameters == sum(math.prod(t.shape) for t in world["base_state"].values())


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_inspect_text_output(world, algorithm):
    result = CliRunner().invoke(main, ["inspect", "-q", "-a", algorithm, str(world["base"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{world['base']}: safetensors, 1 file(s)"
    digest = checksum(world["base"], algorithm=algorithm).model_digest
    assert f"  digest      {algorithm} {digest}" in lines
    assert any(line.split()[:3] == ["lm_head.weight", "F16", "[96,"] for line in lines)


# -- diff -----------------------------------------------------------------------------------
def test_diff_cli_base_vs_target_reports_max_abs_diff(world):
    proc = run_in_process("diff", "--json", world["base"], world["target"])
    assert proc.returncode == 1, proc.stderr
    r = json.loads(proc.stdout)
    assert r["identical"] is False and r["only_a"] == [] and r["only_b"] == []
    a, b = world["base_state"], world["target_state"]
    per_tensor = {n: float((a[n].float() - b[n].float()).abs().max()) for n in a}
    assert {c["name"]: c["max_abs_diff"] for c in r["content"]} == {
        n: v for n, v in per_tensor.items() if v > 0
    }
    assert r["max_abs_diff"] == max(per_tensor.values())
    for c in r["content"]:
        assert c["differing"] == int((a[c["name"]] != b[c["name"]]).sum())


def test_diff_cli_of_a_folder_with_itself_in_another_layout_is_identical(world, tmp_path):
    as_bin = save_checkpoint(world["base_state"], tmp_path / "bin", fmt="bin", shard_bytes=50_000)
    proc = invoke("diff", "-q", world["base"], as_bin)
    assert proc.exit_code == 0, proc.output
    assert proc.stdout.strip() == "identical: 21 tensors with the same names, dtypes, shapes and values"


def test_diff_names_one_sided_shape_and_dtype_differences(world, tmp_path):
    a = dict(world["base_state"])
    b = dict(a)
    b.pop("model.norm.weight")
    b["extra.bias"] = torch.zeros(3, dtype=torch.float16)
    b["lm_head.weight"] = torch.cat([a["lm_head.weight"], a["lm_head.weight"][:1]])
    b["model.layers.0.input_layernorm.weight"] = a["model.layers.0.input_layernorm.weight"].float() + 1
    fa = save_checkpoint(a, tmp_path / "a")
    fb = save_checkpoint(b, tmp_path / "b", fmt="bin")
    r = diff(fa, fb)
    assert not r.identical
    assert r.only_a == ["model.norm.weight"] and r.only_b == ["extra.bias"]
    layout = {d.name: d for d in r.layout}
    assert layout["lm_head.weight"].max_abs_diff is None
    assert layout["lm_head.weight"].b_shape == (97, 64)
    ln = layout["model.layers.0.input_layernorm.weight"]
    assert (ln.a_dtype, ln.b_dtype) == ("F16", "F32") and ln.max_abs_diff == pytest.approx(1.0)
    assert r.content == [] and r.same == 18


def test_diff_is_blockwise_and_exact(world):
    whole = diff(world["base"], world["target"])
    tiny = diff(world["base"], world["target"], block_bytes=300)
    assert whole == tiny


def test_diff_nan_against_a_number_is_infinite(tmp_path):
    from safetensors.torch import save_file

    x = torch.ones(4, 4)
    y = x.clone()
    y[1, 2] = float("nan")
    for name, t in (("x", x), ("y", y)):
        (tmp_path / name).mkdir()
        save_file({"w": t}, tmp_path / name / "model.safetensors")
    r = diff(tmp_path / "x", tmp_path / "y")
    assert r.content[0].differing == 1 and r.content[0].max_abs_diff == float("inf")
    assert diff(tmp_path / "y", tmp_path / "y").identical  # the same NaN bits are identical


# -- help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["checksum", "verify", "inspect", "diff"])
def test_help_has_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"deltamerge {command}" in result.output


@pytest.mark.parametrize("command", ["checksum", "inspect", "diff", "verify"])
def test_missing_folder_is_a_one_line_input_error(world, tmp_path, command):
    nope = str(tmp_path / "nope")
    args = {"diff": [nope, str(world["base"])],
            "verify": [nope, "--manifest", str(world["delta"])]}.get(command, [nope])
    result = CliRunner().invoke(main, [command, *args])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"deltamerge: error: {nope}: no such file or folder"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_python_of_docs_manifest_md_gives_deltamerges_digests(tmp_path, algorithm):
    """docs/manifest.md's snippet for other tools, run as printed (sha256 as its comment says)."""
    import re

    doc = (ROOT / "docs" / "manifest.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    if algorithm == "sha256":
        code = code.replace("from blake3 import blake3", "from hashlib import sha256 as blake3")
    namespace: dict = {}
    exec(code, namespace)
    folder = save_checkpoint(llama_state(0), tmp_path / "m", shard_bytes=40_000)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) > 1
    digest = namespace["model_digest"](namespace["tensor_digests"](files))
    assert digest == checksum(folder, algorithm=algorithm).model_digest


def test_the_digests_usage_and_manifest_show_are_the_demos(tmp_path):
    """docs/usage.md and docs/manifest.md print the demo's result digest in both algorithms."""
    import subprocess
    import sys

    root = ROOT
    subprocess.run([sys.executable, str(root / "scripts" / "make_example.py"), str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    result = apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "rebuilt")
    assert result.verified
    shown = {a: checksum(tmp_path / "rebuilt", algorithm=a).model_digest for a in ALGORITHMS}
    assert shown["blake3"] == result.model_digest
    for doc in ("docs/usage.md", "docs/manifest.md"):
        text = (root / doc).read_text()
        for algorithm, digest in shown.items():
            assert digest in text, (doc, algorithm)
