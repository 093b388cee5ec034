"""Real TensorRT on a Jetson: build plans for the template bundle and for a small bundle shaped like the
product's graph (memory search, MaxPool, TopK), run them, compare with ONNX Runtime.

Deselected by default; on a Jetson (JetPack 5 or 6, venv with --system-site-packages, pycuda):
    pytest -m tensorrt tests/test_engine_tensorrt_device.py
Skips cleanly where tensorrt or pycuda does not import. Each plan build takes seconds to a minute.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from engine.backend import open_backend
from engine.bundle import Bundle
from engine.errors import BackendError
from engine.onnxruntime_backend import OnnxRuntimeBackend
from engine.plan_cache import PlanCache
from engine.preprocess import preprocess_batch
from engine.tensorrt_backend import IO_TENSORS, TensorRTBackend, open_tensorrt_backend
from engine.trt_build import build_plan
from train.synthetic import make_defective, make_good

pytestmark = pytest.mark.tensorrt

# |ONNX Runtime - TensorRT| on maps/scores of inputs normalised to [-1, 1]
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int8": 5e-2}


@pytest.fixture(scope="module")
def trt() -> Any:
    module = pytest.importorskip("tensorrt")
    pytest.importorskip("pycuda.driver")
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plans")


def mixed_frames(bundle: Bundle, batch: int, offset: int = 0) -> np.ndarray:
    images = [make_good(7, offset + i, 96) if i % 2 else make_defective(7, offset + i, 96)[0] for i in range(batch)]
    return preprocess_batch(images, bundle.preprocess)


def compare(bundle: Bundle, backend: TensorRTBackend, batch: int, precision: str) -> None:
    with OnnxRuntimeBackend(bundle, batch=batch) as reference:
        for offset in (0, 100):
            x = mixed_frames(bundle, batch, offset)
            got, want = backend.infer(x), reference.infer(x)
            np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=TOLERANCE[precision])
            np.testing.assert_allclose(got.score, want.score, atol=TOLERANCE[precision])


@pytest.mark.parametrize("batch", [1, 4])
def test_fp32_plan_matches_onnxruntime(trt: Any, template_bundle: Bundle, cache_dir: Path, batch: int) -> None:
    path = build_plan(template_bundle, "fp32", cache_dir=cache_dir, batch=batch, workspace_mb=256)
    with open_tensorrt_backend(template_bundle, batch=batch, precision="fp32", plan_cache=cache_dir,
                               build_if_missing=False) as backend:
        assert backend.plan_path == path and backend.io_api == IO_TENSORS  # 8.5+ all have the name-based API
        compare(template_bundle, backend, batch, "fp32")


def test_fp16_plan_matches_onnxruntime(trt: Any, template_bundle: Bundle, cache_dir: Path) -> None:
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    if not getattr(builder, "platform_has_fast_fp16", True):
        pytest.skip("this GPU has no fast FP16")
    build_plan(template_bundle, "fp16", cache_dir=cache_dir, workspace_mb=256)
    with open_tensorrt_backend(template_bundle, precision="fp16", plan_cache=cache_dir, build_if_missing=False) as backend:
        compare(template_bundle, backend, 1, "fp16")


def test_int8_plan_with_calibration(trt: Any, template_bundle: Bundle, cache_dir: Path, tmp_path: Path) -> None:
    import cv2

    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip("this TensorRT has no calibrated INT8")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(32):
        cv2.imwrite(str(calib / f"{i:03d}.png"), make_good(11, i, 96))
    build_plan(template_bundle, "int8", cache_dir=cache_dir, calib_images=calib, batch=4, workspace_mb=256)
    assert list((cache_dir / "calibration").glob("*.cache"))
    with open_tensorrt_backend(template_bundle, batch=4, precision="int8", plan_cache=cache_dir,
                               build_if_missing=False) as backend:
        compare(template_bundle, backend, 4, "int8")


def test_if_missing_reuses_the_plan(trt: Any, template_bundle: Bundle, cache_dir: Path) -> None:
    first = build_plan(template_bundle, "fp32", cache_dir=cache_dir, workspace_mb=256, if_missing=True)
    stamp = first.stat().st_mtime_ns
    assert build_plan(template_bundle, "fp32", cache_dir=cache_dir, workspace_mb=256, if_missing=True) == first
    assert first.stat().st_mtime_ns == stamp


def test_unloadable_plan_is_rebuilt(trt: Any, template_bundle: Bundle, tmp_path: Path) -> None:
    """deserialize_cuda_engine returns None for a plan TensorRT refuses: rebuilt, not a crash."""
    path = build_plan(template_bundle, "fp32", cache_dir=tmp_path, workspace_mb=256)
    cache = PlanCache(tmp_path)
    [(key, _)] = cache.plans_for(template_bundle.graph_sha256)  # plans are keyed by the graph, not the manifest
    cache.store_plan(key, b"\x00" * 4096)  # sidecar matches, bytes are not a plan
    with pytest.raises(BackendError, match="cannot load this plan"):
        open_tensorrt_backend(template_bundle, plan_cache=tmp_path, build_if_missing=False)
    with open_tensorrt_backend(template_bundle, plan_cache=tmp_path, build_if_missing=True) as backend:
        compare(template_bundle, backend, 1, "fp32")
    assert path.stat().st_size > 4096


def test_auto_prefers_tensorrt_when_a_plan_exists(trt: Any, template_bundle: Bundle, cache_dir: Path) -> None:
    build_plan(template_bundle, "fp32", cache_dir=cache_dir, workspace_mb=256, if_missing=True)
    with open_backend(template_bundle, prefer="auto", plan_cache=cache_dir, build_if_missing=False) as backend:
        assert isinstance(backend, TensorRTBackend)


def test_other_thread_is_refused(trt: Any, template_bundle: Bundle, cache_dir: Path) -> None:
    build_plan(template_bundle, "fp32", cache_dir=cache_dir, workspace_mb=256, if_missing=True)
    errors: List[BaseException] = []
    with open_tensorrt_backend(template_bundle, plan_cache=cache_dir, build_if_missing=False) as backend:
        def worker() -> None:
            try:
                backend.infer(mixed_frames(template_bundle, 1))
            except BackendError as exc:
                errors.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        backend.infer(mixed_frames(template_bundle, 1))  # the owner still works
    assert errors and "another thread" in str(errors[0])


def test_cli_bench_on_tensorrt(trt: Any, template_bundle: Bundle, cache_dir: Path) -> None:
    build_plan(template_bundle, "fp32", cache_dir=cache_dir, workspace_mb=256, if_missing=True)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "bench", str(template_bundle.root), "--backend",
                             "tensorrt", "--cache-dir", str(cache_dir), "--iterations", "50"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("tensorrt (fp32)")


# --- the product-like graph: MatMul on a constant memory, ArgMax/ArgMin, Gather, MaxPool, Resize, TopK ------

@pytest.fixture(scope="module")
def product_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from tests.bundle_factory import make_product_bundle

    return make_product_bundle(tmp_path_factory.mktemp("product_bundle"), batches=(1, 4))


@pytest.mark.parametrize("precision, batch", [("fp32", 1), ("fp32", 4), ("fp16", 1)])
def test_product_graph_builds_and_matches_onnxruntime(trt: Any, product_bundle: Bundle, cache_dir: Path,
                                                      precision: str, batch: int) -> None:
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    if precision == "fp16" and not getattr(builder, "platform_has_fast_fp16", True):
        pytest.skip("this GPU has no fast FP16")
    build_plan(product_bundle, precision, cache_dir=cache_dir, batch=batch, workspace_mb=256)
    with open_tensorrt_backend(product_bundle, batch=batch, precision=precision, plan_cache=cache_dir,
                               build_if_missing=False) as backend:
        with OnnxRuntimeBackend(product_bundle, batch=batch) as reference:
            x = mixed_frames(product_bundle, batch)
            got, want = backend.infer(x), reference.infer(x)
        # relative: the map holds squared distances in the hundreds
        scale = max(1.0, float(np.abs(want.anomaly_map).max()))
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=TOLERANCE[precision] * scale)
        np.testing.assert_allclose(got.score, want.score, atol=TOLERANCE[precision] * scale)


def test_product_graph_int8_keeps_the_search_in_float(trt: Any, product_bundle: Bundle, cache_dir: Path,
                                                      tmp_path: Path) -> None:
    import cv2

    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip("this TensorRT has no calibrated INT8")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(16):
        cv2.imwrite(str(calib / f"{i:03d}.png"), make_good(11, i, 96))
    build_plan(product_bundle, "int8", cache_dir=cache_dir, calib_images=calib, batch=4, workspace_mb=256)
    with open_tensorrt_backend(product_bundle, batch=4, precision="int8", plan_cache=cache_dir,
                               build_if_missing=False) as backend:
        with OnnxRuntimeBackend(product_bundle, batch=4) as reference:
            x = mixed_frames(product_bundle, 4)
            got, want = backend.infer(x), reference.infer(x)
        scale = max(1.0, float(np.abs(want.anomaly_map).max()))
        np.testing.assert_allclose(got.score, want.score, atol=TOLERANCE["int8"] * scale)
