"""The calibration report's figures and page, read from the matplotlib objects and the HTML it wrote: a real
capture of synthetic good parts and real labelled defects, scored by the template bundle (ONNX Runtime)."""
from __future__ import annotations

import dataclasses
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, List

import pytest

from calibration import report
from calibration.capture import Capture, capture_from_images
from calibration.fit import DefectSet, ThresholdsFit, fit_thresholds, score_defect_dataset
from engine.bundle import Bundle
from train.synthetic import write_synthetic_dataset

PNG = b"\x89PNG\r\n\x1a\n"
N_GOOD = 40


@pytest.fixture(scope="module")
def site(template_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("report_site")
    write_synthetic_dataset(root / "ds", n_train=0, n_test_good=N_GOOD, n_test_per_defect=3, seed=5)
    capture = capture_from_images(root / "ds" / "test" / "good", template_bundle.root, root / "cap",
                                  backend="onnxruntime", progress=False)
    defects = score_defect_dataset(root / "ds", template_bundle, backend="onnxruntime", progress=False)
    result = fit_thresholds(capture, 0.1, defects=defects, n_boot=10)
    return {"root": root, "capture": capture, "defects": defects, "result": result}


def tick_labels(axis: Any) -> List[str]:
    """The tick labels drawn inside the axis' limits."""
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1.get_text() for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_text()]


def test_histogram_names_each_line_and_writes_plain_counts(site: Dict[str, Any], tmp_path: Path) -> None:
    result: ThresholdsFit = site["result"]
    defects: DefectSet = site["defects"]
    fig = report.plot_histogram(result, site["capture"].scores, defects, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG
    (ax,) = fig.axes
    legend = ax.get_legend()
    entries = [t.get_text() for t in legend.get_texts()]
    kinds = sorted(defects.scores)
    assert entries[: 1 + len(kinds)] == [f"good frames (n={N_GOOD})"] + [
        f"defect: {k} (n={defects.scores[k].size})" for k in kinds]
    calibrated = [e for e in entries if e.startswith("calibrated threshold")]
    assert calibrated == [f"calibrated threshold {result.thresholds.image_threshold:.4g} "
                          f"({result.thresholds.strategy}; the agent uses it)"]
    assert any(e.startswith("best-F1 threshold") and "labelled defects" in e for e in entries)
    assert "on new good parts expect" in legend.get_title().get_text()
    labels = tick_labels(ax.yaxis)
    assert labels and all(re.fullmatch(r"\d+", label) for label in labels), labels  # "20", not "2×10¹"


def test_tail_ticks_are_rates_in_percent(site: Dict[str, Any], tmp_path: Path) -> None:
    fig = report.plot_tail(site["result"], site["capture"].scores, tmp_path / "t.png")
    (ax,) = fig.axes
    labels = tick_labels(ax.yaxis)
    assert labels and all(label.endswith("%") for label in labels), labels
    assert any("calibrated threshold" in t.get_text() for t in ax.get_legend().get_texts())


def test_a_flagged_frame_without_a_region_says_why(site: Dict[str, Any], tmp_path: Path) -> None:
    """Every frame above a low image threshold, none with a map above an unreachable pixel threshold."""
    result: ThresholdsFit = site["result"]
    capture: Capture = site["capture"]
    odd = dataclasses.replace(result, thresholds=dataclasses.replace(
        result.thresholds, image_threshold=float(capture.scores.min()) - 1, pixel_threshold=float(capture.maps.max()) + 1))
    items = report._good_items(capture, 4)
    fig = report.plot_overlays(items, odd, "flagged", tmp_path / "o.png", 0.0, float(capture.maps.max()))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 4 and all("FLAGGED" in t and report.NO_REGION in t for t in titles), titles


def test_overlay_captions_name_each_frame_once_and_say_missed_for_defects() -> None:
    assert report.frame_label("frames/000035.png", "/data/good/035.png") == "035.png"
    assert report.frame_label("frames/000035.png", "") == "000035.png"
    assert report.overlay_caption("035.png", 1.0, 0, 2.0) == "035.png\nscore 1: not flagged"
    assert report.overlay_caption("pit/001.png", 1.0, 0, 2.0, defective=True) == \
        "pit/001.png\nscore 1: not flagged (missed)"
    assert report.overlay_caption("035.png", 3.0, 2, 2.0) == "035.png\nscore 3: FLAGGED, 2 regions"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: List[str] = []
        self.captions: List[str] = []
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_caption = tag == "figcaption"

    def handle_data(self, data: str) -> None:
        if self._in_caption:
            self.captions.append(data)
            self._in_caption = False


def test_report_page_shows_every_figure_it_wrote(site: Dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report"
    html_path = report.write_report(site["result"], site["capture"], out, site["defects"])
    page = _Page()
    page.feed(html_path.read_text())
    assert page.images[:3] == [report.HISTOGRAM_PNG, report.TAIL_PNG, report.GOOD_OVERLAYS_PNG]
    for name in page.images:
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 5000
    assert len(page.captions) == len(page.images)
    text = html_path.read_text()
    assert "expected false-alarm rate on new good parts" in text and "<h1>Calibration report</h1>" in text


def test_summary_does_not_read_as_a_contradiction(site: Dict[str, Any]) -> None:
    from calibration.fit import summary_lines

    lines = summary_lines(site["result"], site["capture"])
    line = next(x for x in lines if "good frames" in x and "score above it" in x)
    assert line.lstrip().startswith("in this capture") and "on new good parts expect" in line
    assert not any(re.search(r"\brate (of )?0\.\d", x) for x in lines), lines  # rates in percent
