"""scripts/bench.py still runs end to end on the tiny preset (no timings are checked).

Every run is a child process that imports torch, so this runs a subset (a, c, e) to stay fast:
the raw I/O child, deltamerge itself, and the LoRA adapter writer (whose run may still fail
while that kind is missing; the script records that and carries on).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("deltamerge_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_bench_runs_and_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    chart = tmp_path / "chart.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--repeat", "1", "--runs", "a,c,e",
         "--data", str(data), "--json", "--plot", str(chart)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["config"]["preset"] == "tiny"
    assert report["machine"]["cores"] >= 1
    runs = {r["run"]: r for r in report["runs"]}
    assert sorted(runs) == ["a", "c", "e"]
    for name in ("a", "c"):
        assert runs[name]["status"] == "ok", runs[name]
        assert runs[name]["median_s"] > 0 and runs[name]["peak_rss_mib"] > 0
        assert runs[name]["bytes_read"] > runs[name]["bytes_written"] > 0
    assert runs["a"]["ratio_to_a"] == 1.0
    assert runs["e"]["status"] == "ok" or runs["e"]["status"].startswith("failed: ")
    assert chart.is_file() or "matplotlib is not installed" in proc.stderr
    assert list(data.iterdir()) == []  # generated files are cleaned up without --keep

    text = load_bench().table(report["runs"])
    assert "raw I/O baseline" in text and "apply --no-verify" in text
