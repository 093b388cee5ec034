"""The Jetson-side packages: no torch, and Python 3.8 (JetPack 5) as the floor."""
from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("engine", "camera", "agent", "calibration")


def runtime_modules() -> list:
    names = []
    for package in RUNTIME_PACKAGES:
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)])]
    return names


def test_runtime_packages_never_import_torch() -> None:
    modules = runtime_modules()
    assert len(modules) > 10  # the walk found the real modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    if name.endswith('__main__'): continue\n"
            "    importlib.import_module(name)\n"
            "leaked = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
            "print('LEAKED', leaked) if leaked else print('CLEAN')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("CLEAN"), proc.stdout


def test_runtime_packages_run_on_python_38() -> None:
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.fail("vermin is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([vermin, "-t=3.8-", "--no-tips", "--violations", "--eval-annotations", "--backport", "typing_extensions",
                           *RUNTIME_PACKAGES], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
