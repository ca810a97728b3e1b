"""scripts/bench.py still runs end to end on the tiny preset (no timings are checked).

Every run is a child process that imports torch, so this runs a subset (a, b, c) to stay fast:
the disk floor, and deltamerge verified and not; a second bench run reuses the first one's inputs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

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
    proc = bench("--preset", "tiny", "--repeat", "1", "--runs", "a,b,c", "--reuse", data,
                 "--json", "--plot", chart)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["preset"] == "tiny" and report["config"]["reused"] == str(data)
    assert report["machine"]["cores"] >= 1
    assert "reads and writes at once, or where reading through the page cache" in report["note"]
    runs = {r["run"]: r for r in report["runs"]}
    assert sorted(runs) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        assert runs[name]["status"] == "ok", runs[name]
        assert runs[name]["median_s"] > 0 and runs[name]["floor_s"] > 0
        assert 0 < runs[name]["peak_rss_mib"] and runs[name]["peak_source"] == "VmHWM"
        assert runs[name]["bytes_read"] > runs[name]["bytes_written"] > 0
    assert runs["a"]["ratio_to_floor"] == 1.0
    reads = runs["a"]["components"]["reads"]
    assert sorted(reads) == ["base", "delta"] and all(r["bytes"] > 0 for r in reads.values())
    assert runs["a"]["peak_rss_mib"] < runs["b"]["peak_rss_mib"]  # no torch in the floor
    assert chart.is_file() or "matplotlib is not installed" in proc.stderr
    made = json.loads((data / "bench-inputs.json").read_text())
    assert {"base", "target", "delta"} <= set(made["made"])
    assert not (data / "out").exists()

    again = bench("--preset", "tiny", "--repeat", "1", "--runs", "a,c", "--reuse", data)
    assert again.returncode == 0, again.stderr
    assert "generating" not in again.stderr and "make-delta" not in again.stderr
    assert "x floor" in again.stdout and "disk floor" in again.stdout

    other = bench("--preset", "tiny", "--layers", "1", "--runs", "a", "--reuse", data)
    assert other.returncode != 0 and "holds inputs for" in other.stderr

    text = load_bench().table(report["runs"])
    assert "disk floor" in text and "apply --no-verify" in text and "x floor" in text
