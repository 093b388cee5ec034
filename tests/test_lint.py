"""Every package, benchmark, script and test is free of unused imports and undefined names."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("train", "engine", "camera", "agent", "calibration", "benchmarks", "scripts", "tests")


def test_pyflakes_finds_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyflakes", *CHECKED], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert "No module named pyflakes" not in proc.stderr, "pyflakes is not installed: pip install -e '.[dev]'"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
