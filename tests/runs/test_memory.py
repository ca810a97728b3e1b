"""The peak memory deltamerge reports is the run's own (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import ROOT


def test_peak_is_the_childs_own_not_its_parents(tmp_path: Path) -> None:
    """VmHWM starts afresh at exec; ru_maxrss would report the 200 MB parent's peak."""
    prog = (
        "import os, sys\n"
        "ballast = b'x' * (200 << 20)\n"  # touched: resident, not just reserved
        "os.execv(sys.executable, [sys.executable, '-c', "
        "'from deltamerge.memory import peak_rss_bytes; print(peak_rss_bytes())'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert 0 < int(proc.stdout) < 100 << 20
