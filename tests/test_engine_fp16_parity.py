"""FP16 parity on a CPU (engine.fp16_parity, `daad-engine check --fp16-parity`): the product-like graph with
float16 storage emulated, both precisions on real ONNX Runtime, real image files."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import List, Tuple

import cv2
import onnx
import pytest
from onnx import TensorProto, helper

from engine.bundle import Bundle, write_bundle
from engine.cli import main
from engine.errors import ImageError
from engine.fp16_parity import MAP_TOLERANCE, fp16_parity
from engine.preprocess import PreprocessSpec
from tests.bundle_factory import make_product_bundle
from train.synthetic import make_defective, make_good


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Bundle, List[Path]]:
    root = tmp_path_factory.mktemp("fp16")
    bundle = make_product_bundle(root / "bundle")
    images = []
    for i in range(4):
        for name, image in ((f"good{i}.png", make_good(3, i, 96)), (f"pit{i}.png", make_defective(3, 100 + i, 96)[0])):
            cv2.imwrite(str(root / name), image)
            images.append(root / name)
    return bundle, images


def run(args: List[str]) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def test_product_graph_in_fp16_stays_within_the_tolerance(product: Tuple[Bundle, List[Path]]) -> None:
    bundle, images = product
    report = fp16_parity(bundle, images)
    assert report.ok and len(report.rows) == 8
    # measured: about 1.2e-3 of the map's scale, well inside the stated 1 %; and not zero (it really ran in fp16)
    relative = report.worst_map_diff / report.scale
    assert 0 < relative < MAP_TOLERANCE / 5, relative
    assert any(r.score16 != r.score32 for r in report.rows)


def test_a_threshold_between_the_two_scores_is_a_differing_verdict(product: Tuple[Bundle, List[Path]]) -> None:
    """Where FP16 rounds a score across the threshold, the check fails, naming the image."""
    bundle, images = product
    rows = fp16_parity(bundle, images).rows
    row = max(rows, key=lambda r: abs(r.score16 - r.score32))
    threshold = (row.score16 + row.score32) / 2
    report = fp16_parity(bundle, images, threshold=threshold)
    assert report.verdicts_differ == [row.image] and not report.ok
    rc, out, err = run(["check", str(bundle.root), "--fp16-parity", *map(str, images), "--threshold", str(threshold)])
    assert rc == 1 and f"verdicts differ on {row.image}" in err and "Traceback" not in err
    # a threshold away from every score: same verdicts, exit 0
    rc, out, err = run(["check", str(bundle.root), "--fp16-parity", str(images[0].parent), "--threshold", "1000"])
    assert rc == 0, err
    assert "verdicts at threshold 1000: 8 of 8 the same" in out and out.strip().endswith("scores the same in FP16")


def _overflowing_bundle(root: Path) -> Bundle:
    """A graph whose intermediate values exceed float16's range (65504): fine in FP32, inf in FP16."""
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 16, 16])
    big = helper.make_tensor("big", TensorProto.FLOAT, [], [300.0])
    nodes = [helper.make_node("Mul", ["image", "big"], ["a"]), helper.make_node("Mul", ["a", "big"], ["b"]),
             helper.make_node("Div", ["b", "big"], ["anomaly_map"]),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "overflow", [inp],
                              [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, 16, 16]),
                               helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])], initializer=[big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    root.mkdir()
    onnx.save(model, str(root / "model.onnx"))
    return write_bundle(root, "overflow", PreprocessSpec(height=16, width=16), {1: "model.onnx"}, opset=17)


def test_values_beyond_float16_fail_the_check(tmp_path: Path, product: Tuple[Bundle, List[Path]]) -> None:
    bundle = _overflowing_bundle(tmp_path / "overflow")
    images = product[1][:2]
    report = fp16_parity(bundle, images)
    assert not report.ok and report.worst_map_diff == float("inf")
    rc, out, err = run(["check", str(bundle.root), "--fp16-parity", *map(str, images)])
    assert rc == 1 and "the FP16 map drifts beyond the tolerance" in err and "--precision fp32" in err


def test_missing_image_is_one_line(tmp_path: Path, product: Tuple[Bundle, List[Path]]) -> None:
    bundle = product[0]
    with pytest.raises(ImageError, match="no such image file"):
        fp16_parity(bundle, [tmp_path / "nope.png"])
    rc, out, err = run(["check", str(bundle.root), "--fp16-parity", str(tmp_path / "nope.png")])
    assert rc == 1 and err.strip().count("\n") == 0 and "nope.png: no such image file" in err
    (tmp_path / "empty").mkdir()
    rc, out, err = run(["check", str(bundle.root), "--fp16-parity", str(tmp_path / "empty")])
    assert rc == 1 and "empty: no images" in err
