"""`daad-agent --check-config` as a start short of camera and broker, and exit status 78 (EX_CONFIG) for
what no restart can fix: real bundles, real ONNX Runtime, the CLI in a subprocess (no broker needed:
every refusal comes before the first connect)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from agent.cli import EXIT_CONFIG, EXIT_ERROR, exit_code, main
from engine.thresholds import Thresholds, save_thresholds
from engine.bundle import BUNDLE_YAML, Bundle, load_bundle, write_bundle, write_bundle_yaml
from engine.errors import (BackendError, BundleError, CameraError, ConfigError, DaadError, EngineBuildError,
                           ThresholdsError)
from engine.preprocess import PreprocessSpec
from tests.bundle_factory import make_product_bundle
from tests.mqtt_broker import free_port
from tests.test_agent_app import parts, write_config, write_folder

ROOT = Path(__file__).resolve().parents[1]


def run_agent(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent", "--config", str(config), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 78, exactly one line on stderr, no traceback, naming what the test expects."""
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    refusals = [line for line in lines if " INFO " not in line and " WARNING " not in line]
    assert len(refusals) == 1, result.stderr
    for fragment in fragments:
        assert fragment in refusals[0], refusals[0]
    return refusals[0]


def setup(tmp_path: Path, bundle: Bundle, min_area: int = 4) -> Path:
    thresholds = save_thresholds(tmp_path / "thresholds.yaml",
                                 Thresholds(0.5, 0.4, min_area, bundle.sha256, bundle_name=bundle.name))
    folder = write_folder(tmp_path / "incoming", parts("g"))
    return write_config(tmp_path, bundle, thresholds, free_port(), {"kind": "folder", "path": str(folder)})


@pytest.fixture()
def bundle_copy(template_bundle: Bundle, tmp_path: Path) -> Bundle:
    root = tmp_path / "bundle"
    shutil.copytree(template_bundle.root, root)
    return load_bundle(root)


@pytest.fixture()
def restore_logging():  # type: ignore[no-untyped-def]
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_check_config_loads_the_graph_and_scores_a_blank_frame(tmp_path: Path, bundle_copy: Bundle, capsys,
                                                                restore_logging) -> None:
    config = setup(tmp_path, bundle_copy)
    assert main(["--config", str(config), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "manifest verified" in out and "made for this bundle" in out
    assert "backend: onnxruntime scored a blank frame: " in out
    assert "(not opened)" in out and "(not connected)" in out and out.strip().endswith("OK")


def test_product_like_bundle_passes_the_check(tmp_path: Path, capsys, restore_logging) -> None:
    bundle = make_product_bundle(tmp_path / "product")
    assert main(["--config", str(setup(tmp_path, bundle)), "--check-config"]) == 0
    assert "scored a blank frame" in capsys.readouterr().out


def test_check_config_never_builds_a_plan(tmp_path: Path, bundle_copy: Bundle, capsys, restore_logging) -> None:
    """model.backend auto without a cached plan: scored with ONNX Runtime, and the report says why."""
    config = setup(tmp_path, bundle_copy)
    data = yaml.safe_load(config.read_text())
    data["model"].update(backend="auto", precision="fp16", plan_cache=str(tmp_path / "plans"))
    config.write_text(yaml.safe_dump(data))
    assert main(["--config", str(config), "--check-config"]) == 0
    assert "no TensorRT plan cached yet" in capsys.readouterr().out
    assert not (tmp_path / "plans").exists() or not any((tmp_path / "plans").rglob("*.plan"))


def test_tensorrt_backend_where_tensorrt_is_missing_is_refused(tmp_path: Path, bundle_copy: Bundle) -> None:
    config = setup(tmp_path, bundle_copy)
    data = yaml.safe_load(config.read_text())
    data["model"].update(backend="tensorrt")
    config.write_text(yaml.safe_dump(data))
    env_has_trt = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0
    if env_has_trt:
        pytest.skip("TensorRT is installed here")
    assert_refused(run_agent(config, "--check-config"), f"{config}: model.backend: got 'tensorrt'",
                   "set model.backend: auto or onnxruntime")


def _edit_text(old: str, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / BUNDLE_YAML
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
    return edit


def _reseal(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        meta = yaml.safe_load((root / BUNDLE_YAML).read_text())
        change(meta)
        write_bundle_yaml(root, meta)
    return edit


@pytest.mark.parametrize("edit, fragments", [
    # the cases: each passed --check-config before, then was scored wrongly or crashed the agent
    (_edit_text("- 0.5\n", "- 0.2\n"), ["bundle.yaml: field `manifest_sha256`", "re-export the bundle"]),
    (_edit_text("height: 64", "height: 32"), ["bundle.yaml: field `manifest_sha256`"]),
    (_reseal(lambda m: m["preprocess"].update(height=32)), ["bundle.yaml: field `preprocess`", "1x1x64x64"]),
    (_reseal(lambda m: m["outputs"].update(anomaly_map="map")), ["bundle.yaml: field `outputs.anomaly_map`"]),
], ids=["mean-edited", "height-edited", "height-resealed", "output-renamed"])
def test_a_changed_bundle_is_refused_by_check_and_by_start(tmp_path: Path, bundle_copy: Bundle, edit: Callable,
                                                           fragments: List[str]) -> None:
    config = setup(tmp_path, bundle_copy)
    edit(bundle_copy.root)
    assert_refused(run_agent(config, "--check-config"), *fragments)
    assert_refused(run_agent(config, "--max-frames", "1"), *fragments)  # the real start: 78, not a crash loop


def _nan_bundle(root: Path) -> Bundle:
    """Loads and matches its bundle.yaml, but scores NaN: sqrt of a negative input."""
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 16, 16])
    nodes = [helper.make_node("Sub", ["image", "ten"], ["neg"]), helper.make_node("Sqrt", ["neg"], ["anomaly_map"]),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "nan", [inp], [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT,
                                                                                   [1, 1, 16, 16]),
                                                    helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
                              initializer=[helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir()
    onnx.save(model, str(root / "model.onnx"))
    return write_bundle(root, "nan", PreprocessSpec(height=16, width=16), {1: "model.onnx"}, opset=17)


def test_a_graph_that_scores_nan_is_refused_before_the_camera(tmp_path: Path) -> None:
    config = setup(tmp_path, _nan_bundle(tmp_path / "nan"))
    assert_refused(run_agent(config, "--check-config"), "a blank frame scored nan", "re-export the bundle")


def test_thresholds_no_region_can_meet_are_refused(tmp_path: Path, bundle_copy: Bundle) -> None:
    config = setup(tmp_path, bundle_copy, min_area=64 * 64 + 1)
    assert_refused(run_agent(config, "--check-config"), "thresholds.yaml: field `min_defect_area` is 4097",
                   "64x64 = 4096 pixels", "recalibrate")


@pytest.mark.parametrize("error, code", [
    (ConfigError("agent.yaml: x"), EXIT_CONFIG),
    (BundleError("bundle.yaml: x"), EXIT_CONFIG),
    (ThresholdsError("thresholds.yaml: x"), EXIT_CONFIG),
    (BackendError("model.onnx: x"), EXIT_CONFIG),
    (EngineBuildError("model.onnx: x"), EXIT_CONFIG),
    (CameraError("/dev/video0: gone"), EXIT_ERROR),  # a camera may come back: systemd restarts
    (DaadError("anything else"), EXIT_ERROR),
])
def test_exit_status_says_whether_a_restart_can_help(error: DaadError, code: int) -> None:
    assert exit_code(error) == code


def test_the_units_do_not_restart_exit_78() -> None:
    for unit in ("daad-agent.service", "daad-agent@.service"):
        lines = [line for line in (ROOT / "systemd" / unit).read_text().splitlines()
                 if line.startswith("RestartPreventExitStatus=")]
        assert len(lines) == 1 and str(EXIT_CONFIG) in lines[0].split("=", 1)[1].split(), unit


def test_build_helper_leaves_a_refused_bundle_to_the_agent(tmp_path: Path, bundle_copy: Bundle) -> None:
    """ExecStartPre failures are restarted whatever their status: the helper exits 0 and daad-agent exits 78."""
    config = setup(tmp_path, bundle_copy)
    _edit_text("- 0.5\n", "- 0.2\n")(bundle_copy.root)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "systemd/daad-build-plan"), "--config", str(config)], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "field `manifest_sha256`" in done.stderr and "exits 78" in done.stderr and "Traceback" not in done.stderr
