"""daad-engine from the outside: bad input gives one clear line and exit 1, never a traceback."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper

from engine.backend import open_backend
from engine.bundle import BUNDLE_YAML, Bundle, sha256_file, write_bundle, write_bundle_yaml
from engine.errors import BackendError
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.preprocess import PreprocessSpec

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def run_cli(args: List[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env: Dict[str, str] = dict(os.environ, DAAD_PLAN_CACHE=str(tmp_path / "plans"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def run_main(args: List[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess:
    """The same CLI in this process (cheaper than a subprocess where the traceback guard is not the point)."""
    import contextlib
    import io

    from engine.cli import main

    monkeypatch.setenv("DAAD_PLAN_CACHE", str(tmp_path / "plans"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse: --help and usage errors
            rc = int(exc.code or 0)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_one_clear_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("daad-engine")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def bundle_copy(template_bundle: Bundle, tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    return root


def _edit_yaml(root: Path, edit) -> None:  # type: ignore[no-untyped-def]
    meta = yaml.safe_load((root / BUNDLE_YAML).read_text())
    edit(meta)
    (root / BUNDLE_YAML).write_text(yaml.safe_dump(meta, sort_keys=False))


def test_missing_bundle(tmp_path: Path) -> None:
    result = run_cli(["info", str(tmp_path / "nowhere")], tmp_path)
    assert_one_clear_error(result, "nowhere", "bundle directory not found")


def test_truncated_model_is_caught_by_the_hash(bundle_copy: Path, tmp_path: Path) -> None:
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    for command in (["info"], ["check"]):
        result = run_cli([command[0], str(bundle_copy), *command[1:]], tmp_path)
        assert_one_clear_error(result, "model.onnx", "does not match", "copy the bundle again")


def test_truncated_model_with_matching_hash(bundle_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated before hashing (a broken export, hash and manifest made after): refused at load, clearly."""
    model = bundle_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    meta = yaml.safe_load((bundle_copy / BUNDLE_YAML).read_text())
    meta["graphs"][0].update(sha256=sha256_file(model))
    write_bundle_yaml(bundle_copy, meta)
    result = run_cli(["bench", str(bundle_copy), "--backend", "onnxruntime", "--iterations", "2"], tmp_path)
    assert_one_clear_error(result, "model.onnx", "not a readable ONNX model")
    result = run_main(["check", str(bundle_copy)], tmp_path, monkeypatch)
    assert_one_clear_error(result, "model.onnx", "not a readable ONNX model")


def test_edited_bundle_yaml_is_one_clear_line(bundle_copy: Path, tmp_path: Path) -> None:
    """The issue's case: preprocessing mean 0.5 -> 0.2 by hand; every command refuses the bundle."""
    path = bundle_copy / BUNDLE_YAML
    path.write_text(path.read_text().replace("- 0.5\n", "- 0.2\n", 1))
    for command in ("info", "check", "bench"):
        result = run_cli([command, str(bundle_copy)], tmp_path)
        assert_one_clear_error(result, "bundle.yaml", "field `manifest_sha256`", "re-export the bundle")


def test_tampered_hash(bundle_copy: Path, tmp_path: Path) -> None:
    _edit_yaml(bundle_copy, lambda m: m["graphs"][1].update(sha256="0" * 64))
    result = run_cli(["info", str(bundle_copy)], tmp_path)
    assert_one_clear_error(result, "model_b4.onnx", "graphs[batch=4].sha256")


def test_unknown_format_version(bundle_copy: Path, tmp_path: Path) -> None:
    _edit_yaml(bundle_copy, lambda m: m.update(format_version=99))
    result = run_cli(["bench", str(bundle_copy)], tmp_path)
    assert_one_clear_error(result, "bundle.yaml", "format_version: got 99, expected 1", "upgrade daad-inspect")


def test_batch_the_bundle_lacks(template_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main(["bench", str(template_bundle.root), "--batch", "2", "--iterations", "1"], tmp_path, monkeypatch)
    assert_one_clear_error(result, "no graph for batch 2", "[1, 4]")


def test_bench_prints_the_table(template_bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli(["bench", str(template_bundle.root), "--iterations", "20", "--warmup", "2", "--batch", "4",
                      "--json", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["backend", "batch", "p50", "ms"] and "fps" in header and "peak RSS MB" in header
    assert row.startswith("onnxruntime (CPUExecutionProvider)")
    assert "TensorRT not used" in result.stderr  # auto says why it chose ONNX Runtime
    data = json.loads(out.read_text())
    assert data["batch"] == 4 and data["iterations"] == 20 and data["p99_ms"] >= data["p50_ms"] > 0
    assert data["fps"] > 0 and data["peak_rss_mb"] > 0


def test_bench_tensorrt_requested_without_it(template_bundle: Bundle, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = run_main(["bench", str(template_bundle.root), "--backend", "tensorrt"], tmp_path, monkeypatch)
    assert_one_clear_error(result, "TensorRT backend requested but unavailable")


def test_build_without_tensorrt(template_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a desktop, even on a Jetson
    result = run_main(["build", str(template_bundle.root), "--precision", "fp16"], tmp_path, monkeypatch)
    assert_one_clear_error(result, "TensorRT is not importable", "--allow-missing-tensorrt")
    result = run_main(["build", str(template_bundle.root), "--precision", "fp16", "--if-missing",
                       "--allow-missing-tensorrt"], tmp_path, monkeypatch)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "daad-engine: warning: no plan built" in result.stderr and result.stdout == ""


def test_build_checks_the_bundle_before_tensorrt(bundle_copy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_yaml(bundle_copy, lambda m: m.update(format_version=0))
    result = run_main(["build", str(bundle_copy), "--precision", "fp32", "--allow-missing-tensorrt"], tmp_path,
                      monkeypatch)
    assert_one_clear_error(result, "format_version: got 0")


def test_check_passes_and_fails(template_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main(["check", str(template_bundle.root)], tmp_path, monkeypatch)
    assert result.returncode == 0 and result.stdout.startswith("OK:"), result.stderr

    graph = helper.make_graph(
        [helper.make_node("Unique", ["image"], ["u"], name="dedupe"),
         helper.make_node("Identity", ["image"], ["anomaly_map"], name="map"),
         helper.make_node("ReduceMax", ["image"], ["score"], name="score_max", axes=[1, 2, 3], keepdims=0)],
        "bad", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("anomaly_map", onnx.TensorProto.FLOAT, ["N", 1, 16, 16]),
         helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root = tmp_path / "bad"
    root.mkdir()
    onnx.save(model, str(root / "model.onnx"))
    write_bundle(root, "bad", PreprocessSpec(height=16, width=16), {1: "model.onnx"}, opset=17)
    result = run_main(["check", str(root)], tmp_path, monkeypatch)
    assert result.returncode == 1
    assert "node 'dedupe' (Unique): Unique is not in TensorRT's ONNX operator support list" in result.stdout
    assert "input 'image': shape ['N', 1, 16, 16] is not static" in result.stdout
    assert result.stderr.startswith("daad-engine: error: ") and "problem(s)" in result.stderr


def test_info_prints_metadata(template_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main(["info", str(template_bundle.root)], tmp_path, monkeypatch)
    assert result.returncode == 0, result.stderr
    assert "graphs (SHA-256 verified)" in result.stdout and template_bundle.sha256 in result.stdout
    assert "preprocess:      gray, 64x64" in result.stdout and "plans cached in" in result.stdout


@pytest.mark.parametrize("command", [[], ["build"], ["check"], ["bench"], ["info"], ["sign"]])
def test_help_is_the_manual(command: List[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main([*command, "--help"], tmp_path, monkeypatch)
    assert result.returncode == 0 and result.stdout.startswith("usage: daad-engine")
    if command == ["build"]:
        assert "--allow-missing-tensorrt" in result.stdout and "ExecStartPre=" in result.stdout


def test_python_dash_m_engine_and_console_script(template_bundle: Bundle, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "engine", "check", str(template_bundle.root)], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    script = shutil.which("daad-engine")
    if script:
        result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0 and "daad-engine" in result.stdout


# --- in-process ------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, message", [
    (np.zeros((1, 3, 64, 64), np.float32), "input shape must be (1, 1, 64, 64)"),  # colour frame to a gray model
    (np.zeros((1, 1, 64, 64), np.float64), "input dtype must be float32"),  # forgot engine.preprocess
    (np.zeros((1, 64, 64, 1), np.uint8), "input dtype must be float32"),
    ([[0.0]], "input must be a numpy array"),
])
def test_onnxruntime_backend_refuses_wrong_input(template_bundle: Bundle, batch: object, message: str) -> None:
    with OnnxRuntimeBackend(template_bundle) as backend:
        with pytest.raises(BackendError) as info:
            backend.infer(batch)  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_open_backend_auto_falls_back_and_says_why(template_bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT, even on a Jetson
    caplog.set_level(logging.INFO, logger="engine")
    with open_backend(template_bundle, prefer="auto") as backend:
        assert isinstance(backend, OnnxRuntimeBackend)
    assert "TensorRT not used (tensorrt is not importable" in caplog.text
    assert "backend: ONNX Runtime" in caplog.text
    with pytest.raises(BackendError, match="TensorRT backend requested but unavailable"):
        open_backend(template_bundle, prefer="tensorrt")
