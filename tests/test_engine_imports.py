"""engine/ stays light: no torch, no TensorRT at import time (Python 3.8 compatibility: test_runtime_packages)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE_MODULES = ["engine.cli", "engine.tensorrt_backend", "engine.trt_build", "engine.plan_cache",
                  "engine.calibrator", "engine.check", "engine.trt_support", "engine.bench"]


def test_engine_imports_neither_torch_nor_tensorrt() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in ENGINE_MODULES)
            + "heavy = [m for m in ('torch', 'tensorrt', 'pycuda', 'onnx', 'onnxruntime', 'train') if m in sys.modules]\n"
            + "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
