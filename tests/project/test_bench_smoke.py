"""scripts/bench.py still runs end to end on the tiny preset (no timings are checked).

Every run is a child process that imports torch, so one bench run measures few of them: the disk
floor, the GGUF k-quant and the DoRA merge, with llama-quantize skipped; a second reuses the first
one's inputs. The other adapter types' generated files are merged in this process, and the thread
counts and time ratios are checked on the script's own objects. Run i on another architecture
(--arch) runs once, on a tiny Mixtral, where llama.cpp's vocab GGUFs are (``llamacpp.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, load_state
from llamacpp import llamacpp_dir

from deltamerge.apply import apply_delta

SCRIPT = ROOT / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("deltamerge_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_tiny_bench_runs_reports_and_reuses_its_inputs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    chart = tmp_path / "chart.png"
    proc = bench("--preset", "tiny", "--repeat", "1", "--runs", "a,n,o,p", "--threads", "1",
                 "--reuse", data, "--json", "--plot", chart)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    config = report["config"]
    assert config["preset"] == "tiny" and config["reused"] == str(data)
    assert config["threads"] == [1] and config["outtype"] == "q4_k_m" and config["llama_quantize"] is None
    assert report["machine"]["cores"] >= 1
    assert "reads and writes at once, or where reading through the page cache" in report["note"]
    runs = {r["run"]: r for r in report["runs"]}
    assert sorted(runs) == ["a", "n", "o", "p"]
    for name in ("a", "n", "p"):
        assert runs[name]["status"] == "ok", runs[name]
        assert runs[name]["median_s"] > 0 and runs[name]["floor_s"] > 0
        assert 0 < runs[name]["peak_rss_mib"] and runs[name]["peak_source"] == "VmHWM"
        assert runs[name]["bytes_read"] > runs[name]["bytes_written"] > 0
    assert runs["a"]["threads"] is None and runs["n"]["threads"] == runs["p"]["threads"] == 1
    assert runs["o"]["status"].startswith("skipped: no --llama-quantize")
    assert runs["n"]["outtype"] == "q4_k_m" and "time_ratio_to_o" not in runs["n"]
    assert runs["a"]["ratio_to_floor"] == 1.0
    reads = runs["a"]["components"]["reads"]
    assert sorted(reads) == ["base", "delta", "dora"]
    assert all(r["bytes"] > 0 for r in reads.values())
    assert runs["a"]["peak_rss_mib"] < runs["p"]["peak_rss_mib"]  # no torch in the floor
    assert chart.is_file() or "matplotlib is not installed" in proc.stderr
    made = json.loads((data / "bench-inputs.json").read_text())
    assert {"base", "target", "delta", "dora"} <= set(made["made"])
    assert not {"gguf16", "lora"} & set(made["made"])  # run o skipped, e not asked for
    assert not (data / "out").exists()

    again = bench("--preset", "tiny", "--repeat", "1", "--runs", "a", "--reuse", data)
    assert again.returncode == 0, again.stderr
    assert "generating" not in again.stderr and "make-delta" not in again.stderr
    assert "x floor" in again.stdout and "disk floor" in again.stdout

    mod = load_bench()
    other = mod.Bench(mod.parse_args(["--preset", "tiny", "--layers", "1", "--reuse", str(data)]), data)
    with pytest.raises(SystemExit, match="holds inputs for"):
        other.check_reusable()

    base = load_state(data / "base")
    for kind in ("lora", "ia3", "loha", "lokr"):  # the generated files are adapters deltamerge merges
        mod.write_adapter(mod.PRESETS["tiny"], kind, tmp_path / kind, sparse=False)
        apply_delta(data / "base", tmp_path / kind, tmp_path / f"out-{kind}")
        merged = load_state(tmp_path / f"out-{kind}")
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert not torch.equal(merged[name], base[name]), (kind, name)
        assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])

    text = mod.table(report["runs"])
    assert "disk floor" in text and "p@1 DoRA merge" in text and "x floor" in text


def test_threads_give_each_run_its_slots_and_ratios(tmp_path: Path) -> None:
    mod = load_bench()
    args = mod.parse_args(["--runs", "a,d,e,o,p", "--threads", "1,2,1", "--outtype", "q5_k_s",
                           "--llama-quantize", sys.executable])
    assert args.threads == [1, 2]
    b = mod.Bench(args, tmp_path)
    assert b.slots() == [("a", None, None), ("d", None, None), ("e", 1, None), ("e", 2, None),
                         ("o", 1, None), ("o", 2, None), ("p", 1, None), ("p", 2, None)]
    e2, _ = b.command("e", 2)
    assert e2[e2.index("--threads") + 1] == "2" and str(tmp_path / "lora") in e2
    assert "--threads" not in b.command("d")[0]  # make-delta has no compute pool
    assert b.command("o", 2)[0][0] == sys.executable and b.command("o", 2)[0][-2:] == ["Q5_K_S", "2"]
    assert b.quantize_threads(None) == os.cpu_count()

    walls = {("e", 1, None): 2.0, ("e", 2, None): 1.0, ("p", 1, None): 3.0, ("p", 2, None): 1.5,
             ("a", None, None): 1.0}
    results = {slot: mod.RunResult(*slot, walls=[w], peak_rss=[2**20]) for slot, w in walls.items()}
    b.add_time_ratios(results)
    assert results[("p", 2, None)].extra == {"time_ratio_to_e": 1.5, "time_ratio_to_threads_1": 0.5}
    assert results[("p", 1, None)].extra == {"time_ratio_to_e": 1.5}
    assert results[("e", 2, None)].extra == {"time_ratio_to_threads_1": 0.5}
    assert results[("e", 1, None)].extra == {} and results[("a", None, None)].extra == {}
    rows = [results[slot].summary() for slot in (("p", 2, None), ("e", 1, None))]
    assert mod.ratio_lines(rows) == ["p@2: takes 1.50x run e@2's time (LoRA merge r=64)",
                                     "p@2: takes 0.50x its time with --threads 1"]

    for bad in (["--threads", "0"], ["--threads", "two"], ["--llama-quantize", str(tmp_path)]):
        with pytest.raises(SystemExit):
            mod.parse_args(bad)


def test_run_i_on_another_architecture_builds_it_at_the_presets_widths(tmp_path: Path) -> None:
    """--arch: a tiny Mixtral of transformers' classes with LLaMA's real sentencepiece vocabulary
    (from llama.cpp's vocab GGUF), its delta applied to GGUF f16 beside run i on the LLaMA inputs."""
    data = tmp_path / "data"
    proc = bench("--preset", "tiny", "--repeat", "1", "--runs", "i", "--arch", "mixtral",
                 "--llamacpp", llamacpp_dir(), "--data", data, "--keep", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["arch"] == ["mixtral"]
    llama, mixtral = report["runs"]
    assert (llama["arch"], mixtral["arch"]) == (None, "mixtral")
    assert llama["status"] == mixtral["status"] == "ok", report["runs"]
    assert mixtral["label"] == "apply to GGUF f16 (Mixtral)" and "4 experts" in mixtral["widths"]
    for row in (llama, mixtral):
        assert row["bytes_written"] > 0 and row["s_per_gb_written"] > 0
    expected = mixtral["median_s"] / mixtral["bytes_written"] / (llama["median_s"] / llama["bytes_written"])
    assert mixtral["per_byte_ratio_to_llama"] == pytest.approx(expected, rel=0.01)
    assert "generating the Mixtral base and target" in proc.stderr

    folder = data / "arch-mixtral"
    assert sorted(p.name for p in folder.iterdir()) == ["base", "delta"]  # the target removed
    config = json.loads((folder / "base" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["hidden_size"], config["num_local_experts"], config["vocab_size"]) == (128, 4, 32000)
    base = load_state(folder / "base")
    assert base["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (344, 128)
    assert base["model.embed_tokens.weight"].shape == (32000, 128)
    assert (folder / "base" / "tokenizer.model").is_file()


def test_arch_slots_ratios_and_refusals(tmp_path: Path) -> None:
    mod = load_bench()
    for bad in (["--runs", "a", "--arch", "qwen2"], ["--runs", "i", "--arch", "gptj"]):
        with pytest.raises(SystemExit):
            mod.parse_args([*bad, "--llamacpp", str(tmp_path)])
    (tmp_path / "models").mkdir()
    args = mod.parse_args(["--runs", "a,i", "--arch", "all", "--threads", "1,2", "--llamacpp", str(tmp_path)])
    assert args.arch == list(mod.ARCHITECTURES) and "gemma3" in args.arch and "gpt_neox" in args.arch
    args = mod.parse_args(["--runs", "a,i", "--arch", "qwen2,falcon", "--threads", "2",
                           "--llamacpp", str(tmp_path)])
    b = mod.Bench(args, tmp_path / "data")
    assert b.slots() == [("a", None, None), ("i", 2, None), ("i", 2, "qwen2"), ("i", 2, "falcon")]
    cmd, _ = b.command("i", 2, "qwen2")
    assert str(tmp_path / "data" / "arch-qwen2" / "base") in cmd and cmd[-2:] == ["--threads", "2"]

    walls = {("i", 2, None): (10.0, 10**9), ("i", 2, "qwen2"): (33.0, 3 * 10**9)}
    results = {slot: mod.RunResult(*slot, walls=[w], peak_rss=[2**20], bytes_written=n)
               for slot, (w, n) in walls.items()}
    results[("i", 2, "falcon")] = mod.RunResult("i", 2, "falcon", status="skipped: deltamerge refuses it")
    b.add_time_ratios(results)
    assert results[("i", 2, "qwen2")].extra == {"per_byte_ratio_to_llama": 1.1}
    assert results[("i", 2, None)].extra == {} and results[("i", 2, "falcon")].extra == {}
    rows = [r.summary() for r in results.values()]
    assert rows[1]["s_per_gb_written"] == 11.0
    assert mod.ratio_lines(rows) == ["i:qwen2@2: 11.00 s per GB of GGUF written, 1.10x run i@2's (LLaMA's)"]
    text = mod.table(rows)
    assert "i:qwen2@2 apply to GGUF f16 (Qwen2)" in text
    assert "i:falcon@2 apply to GGUF f16 (Falcon)" in text and "skipped: deltamerge refuses it" in text
