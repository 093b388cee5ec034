"""The evaluation's figures (train/plots.py), read from the matplotlib objects they drew: panels, legends,
captions, colours and where the titles sit; plus the PNG on disk. The images are the synthetic parts; the maps
are their masks, blurred, over a little noise (what a model that found the defect would give)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from engine import figures
from train import plots
from train.synthetic import make_defective, make_good

PNG = b"\x89PNG\r\n\x1a\n"
BEST = plots.Threshold(6.0, "best-F1 threshold 6 (on these labelled images)")
CALIBRATED = plots.Threshold(7.5, "calibrated threshold 7.5 (the agent's, thresholds.yaml)", calibrated=True)


def assert_png(path: Path) -> None:
    assert path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG


def legend_texts(ax: Any) -> List[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def as_map(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(mask.astype(np.float32) * 10, (0, 0), 2) + rng.random(mask.shape).astype(np.float32)


@pytest.fixture(scope="module")
def cases() -> List[plots.Case]:
    """Two defects (one scored above both thresholds, one below) and two good parts (one a false alarm)."""
    rng = np.random.default_rng(0)
    out = []
    for i, score in enumerate((9.0, 5.0)):
        image, mask, kind = make_defective(0, 300 + i, size=96)
        out.append(plots.Case(f"{i:03d}.png", kind, image / 255.0, as_map(mask > 0, rng), mask > 0, score))
    for i, score in enumerate((8.0, 2.0)):
        image = make_good(0, 200 + i, size=96)
        out.append(plots.Case(f"{i:03d}.png", "good", image / 255.0, as_map(np.zeros_like(image, bool), rng),
                              np.zeros_like(image, bool), score))
    return out


def test_histogram_puts_good_behind_gives_each_type_its_colour_and_names_each_threshold(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    good = rng.normal(4, 1, 60)
    defective = {kind: rng.normal(9, 2, 5) for kind in ("crack", "pit", "scratch", "spot")}
    fig = plots.plot_histogram(good, defective, tmp_path / "scores.png", "scores", [BEST, CALIBRATED])
    assert_png(tmp_path / "scores.png")
    (ax,) = fig.axes
    assert legend_texts(ax) == ["good (n=60)", "crack (n=5)", "pit (n=5)", "scratch (n=5)", "spot (n=5)",
                                BEST.label, CALIBRATED.label]
    from matplotlib.patches import Polygon

    (good_bars,) = ax.containers  # the good images: filled bars; each defect type: one outline (a polygon)
    outlines = [patch for patch in ax.patches if isinstance(patch, Polygon)]
    assert len(outlines) == 4
    assert all(bar.get_zorder() < outline.get_zorder() for bar in good_bars for outline in outlines)
    colours = [tuple(outline.get_edgecolor()) for outline in outlines]
    assert len(set(colours)) == 4, colours  # four types, four colours (pit and spot were alike before)
    from matplotlib.colors import to_rgba

    assert to_rgba(figures.GOOD_COLOUR, 0.5) not in colours
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines[CALIBRATED.label].get_xdata()[0] == 7.5 and lines[BEST.label].get_xdata()[0] == 6.0


def test_a_seventh_defect_type_differs_from_the_first_by_its_line() -> None:
    styles = list(figures.defect_styles([f"type{i}" for i in range(7)]).values())
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 7


def test_roc_has_one_labelled_curve_per_type_the_pooled_one_and_chance(tmp_path: Path) -> None:
    curve = (np.array([0, 0.2, 1.0]), np.array([0, 0.9, 1.0]), 0.91)
    fig = plots.plot_roc({"all": curve, "crack": curve, "pit": curve}, tmp_path / "roc.png", "ROC")
    assert_png(tmp_path / "roc.png")
    (ax,) = fig.axes
    assert legend_texts(ax) == ["all defects (AUROC 0.910)", "crack (AUROC 0.910)", "pit (AUROC 0.910)", "chance"]
    assert len({line.get_color() for line in ax.get_lines()}) == 4


def test_overlays_caption_each_image_truly(cases: List[plots.Case], tmp_path: Path) -> None:
    fig = plots.plot_overlays(cases, tmp_path / "worst.png", "worst cases", 10.0, CALIBRATED)
    assert_png(tmp_path / "worst.png")
    cells = fig.subfigs
    assert len(cells) == len(cases)
    captions = [cell._suptitle.get_text() for cell in cells]
    kinds = [c.kind for c in cases]
    assert captions == [f"{kinds[0]}/000.png: score 9, caught", f"{kinds[1]}/001.png: score 5, missed",
                        "good/000.png: score 8, false alarm", "good/001.png: score 2, passed"]
    for case, cell in zip(cases, cells):
        image, heat = cell.axes
        assert len(cell.axes) == 2 and case.name not in image.get_title() + heat.get_title()  # the name once
        if case.kind == "good":
            assert heat.get_title() == "heat map (good: no defect)" and not heat.collections
        else:
            assert "true defect" in heat.get_title() and heat.collections  # the mask's outline is drawn
    assert "verdicts at the calibrated threshold 7.5" in fig._suptitle.get_text()
    unmasked = cases[0]._replace(mask=np.zeros_like(cases[0].mask))  # a defect labelled without a mask
    (cell,) = plots.plot_overlays([unmasked], tmp_path / "one.png", "one", 10.0).subfigs
    assert cell.axes[1].get_title() == "heat map (no defect mask)" and not cell.axes[1].collections


def overlapping_titles(fig: Any) -> List[str]:
    """The titles (of the figure, its cells and its panels) whose drawn box overlaps a panel's."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [fig._suptitle] + [cell._suptitle for cell in fig.subfigs] + [ax.title for ax in fig.axes]
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    return [t.get_text() for t in titles if t is not None and t.get_text()
            and any(t.get_window_extent(renderer).overlaps(box) for box in boxes)]


def test_no_title_overlaps_an_image(cases: List[plots.Case], tmp_path: Path) -> None:
    """Two rows of cells: the second row's titles stay clear of the first row's images."""
    fig = plots.plot_overlays(cases * 2, tmp_path / "grid.png", "grid", 10.0, BEST)
    assert overlapping_titles(fig) == []


def test_the_overlap_check_finds_the_old_layouts_overlaps() -> None:
    """The old grid (rows 2.2 in tall, tight_layout) put the second row's titles on the first row's images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.4))
    FigureCanvasAgg(fig)
    for ax in fig.subplots(2, 8).ravel():
        ax.imshow(np.zeros((96, 96)))
        ax.axis("off")
        ax.set_title("good/011.png score 5.92", fontsize=7)
    fig.suptitle("DAAD+: worst cases")  # tight_layout made room for it by pushing the rows together
    fig.tight_layout()
    assert len(overlapping_titles(fig)) >= 4


def test_overlay_without_a_threshold_or_score_says_what_it_knows(cases: List[plots.Case], tmp_path: Path) -> None:
    """benchmarks/research/probe_maps.py draws maps with neither."""
    unscored = [c._replace(score=float("nan")) for c in cases[:2]]
    fig = plots.plot_overlays(unscored, tmp_path / "maps.png", "maps", 10.0)
    assert [cell._suptitle.get_text() for cell in fig.subfigs] == [f"{c.kind}/{c.name}" for c in unscored]
    assert "verdicts" not in fig._suptitle.get_text()


def test_heat_overlay_leaves_a_quiet_image_as_it_is_and_colours_a_hot_spot() -> None:
    image = make_good(0, 1, size=64) / 255.0
    amap = np.zeros((32, 32), np.float32)
    quiet = figures.heat_overlay(image, amap, 0.0, 1.0)
    assert quiet.shape == (64, 64, 3) and np.allclose(quiet, image[:, :, None], atol=1e-6)
    amap[10:20, 10:20] = 1.0
    hot = figures.heat_overlay(image, amap, 0.0, 1.0)
    assert np.abs(hot - image[:, :, None]).max() > 0.3
    colour = make_good(0, 1, size=64, color=True)  # uint8 BGR, as the calibration frames are read
    assert np.allclose(figures.heat_overlay(colour, amap * 0, 0.0, 1.0), colour.mean(axis=2, keepdims=True) / 255,
                       atol=1e-6)


def test_a_defect_at_the_best_f1_threshold_is_caught_and_at_the_agents_is_missed(cases: List[plots.Case]) -> None:
    """Best F1 (sklearn) flags a score equal to its threshold; the agent flags only scores above its own."""
    from train.report import best_f1_threshold

    at = cases[0]._replace(score=6.996)
    assert plots.verdict(at, best_f1_threshold(6.996)) == "caught"
    assert plots.verdict(at, plots.Threshold(6.996, "calibrated", calibrated=True)) == "missed"
    assert plots.caption(at, best_f1_threshold(6.996)).endswith("score 6.996, caught")  # not "score 7, missed"
