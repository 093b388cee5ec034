"""The calibration report a person reads: PNG plots, report.html tying them together, report.md.

Each plot function writes its PNG and returns the matplotlib Figure (tests read its panels and legend).
Colours, layout and ticks come from engine.figures, the page's pieces from engine.report_html: the same as
the evaluation report's (train/report.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine import figures as fg
from engine import report_html as rh
from engine.bundle import atomic_write_text
from engine.errors import ImageError
from engine.messages import pct
from engine.preprocess import read_image
from engine.regions import count_regions

from . import stats
from .capture import Capture
from .fit import DefectSet, ThresholdsFit, summary_lines

logger = logging.getLogger(__name__)

HISTOGRAM_PNG = "histogram.png"
TAIL_PNG = "tail.png"
GOOD_OVERLAYS_PNG = "good_overlays.png"
MISSED_OVERLAYS_PNG = "missed_defects.png"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
N_OVERLAYS = 8  # highest-scoring good frames (and lowest-scoring defects) shown
OVERLAY_COLUMNS = 4
HIST_BINS = 50
PANEL_INCHES = 3.0
FLAG_COLOUR = fg.VERMILLION  # a flagged frame's caption
NO_REGION = "image score above the threshold;\nno pixel region above the pixel threshold"


def calibrated_label(result: ThresholdsFit) -> str:
    t = result.thresholds
    return f"calibrated threshold {t.image_threshold:.4g} ({t.strategy}; the agent uses it)"


def plot_histogram(result: ThresholdsFit, good: np.ndarray, defects: Optional[DefectSet], path: Path) -> Any:
    """Good (and defect) score histograms with the threshold lines and the expected rates."""
    fig = fg.new_figure(9.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    kinds = sorted(defects.scores) if defects else []
    values = [good] + [defects.scores[k] for k in kinds] if defects else [good]
    lo, hi = float(min(v.min() for v in values)), float(max(v.max() for v in values))
    hi = max(hi, result.thresholds.image_threshold)
    bins = np.linspace(lo, hi + 1e-9 + (hi - lo) * 0.02, HIST_BINS + 1)
    ax.hist(good, bins=bins, color=fg.GOOD_COLOUR, alpha=0.5, zorder=1, label=f"good frames (n={good.size})")
    if defects:
        for kind, style in fg.defect_styles(kinds).items():
            ax.hist(defects.scores[kind], bins=bins, histtype="step", linewidth=1.8, zorder=2,
                    label=f"defect: {kind} (n={defects.scores[kind].size})", **style)
    t = result.thresholds
    ax.axvline(t.image_threshold, color=fg.CALIBRATED_COLOUR, linewidth=2, zorder=3, label=calibrated_label(result))
    if result.best_f1 is not None and result.best_f1.threshold != t.image_threshold:
        ax.axvline(result.best_f1.threshold, color=fg.BEST_F1_COLOUR, linestyle="--", zorder=3,
                   label=f"best-F1 threshold {result.best_f1.threshold:.4g} (on the labelled defects)")
    if result.at_chosen.strategy == "best_f1":
        ax.axvline(result.image.threshold, color=fg.BEST_F1_COLOUR, linestyle=":", zorder=3,
                   label=f"threshold for the target rate {result.image.threshold:.4g}")
    ax.set_yscale("log")  # the tail, where the threshold sits, is a handful of frames
    fg.plain_log_ticks(ax.yaxis)
    ax.set_xlabel("image score")
    ax.set_ylabel("frames (log scale)")
    c = result.at_chosen
    text = [f"on new good parts expect {pct(c.expected_rate)} flagged",
            f"95% interval {pct(c.ci[0])} - {pct(c.ci[1])}"]
    if result.misses.get("all"):
        text.append(f"labelled defects missed: {pct(result.misses['all']['miss_rate'])}")
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    legend.set_title("\n".join(text), prop={"size": 8})  # the rates, above what the lines are
    ax.set_title(f"Image scores: {t.bundle_name}, target false-alarm rate {pct(result.image.target)}")
    fg.save(fig, path)
    return fig


def plot_tail(result: ThresholdsFit, good: np.ndarray, path: Path) -> Any:
    """Exceedance curve of the good scores (log), the target, the threshold and the tail fit if any."""
    fig = fg.new_figure(9.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    s = np.sort(good)
    n = s.size
    exceed = (n - np.arange(n)) / (n + 1.0)  # P(score > s_i) estimated without reaching 0 at the maximum
    ax.step(s, exceed, where="post", color=fg.GOOD_COLOUR, label="good frames (empirical)")
    target = result.image.target
    ax.axhline(target, color="0.4", linestyle=":", label=f"target {pct(target)}")
    ax.axhline(stats.RULE_OF_THREE / n, color="0.7", linestyle="--",
               label=f"the lowest rate {n} frames resolve (3/N = {pct(stats.RULE_OF_THREE / n)})")
    gpd = result.image.gpd
    if gpd and gpd.get("scale", 0) > 0 and gpd.get("zeta", 0) > 0:
        fit = stats.GpdFit(u=gpd["u"], zeta=gpd["zeta"], shape=gpd["shape"], scale=gpd["scale"],
                           n_exceed=gpd["n_exceed"], gof_pvalue=gpd["gof_pvalue"], problems=tuple(gpd["problems"]))
        top = max(result.thresholds.image_threshold, s[-1]) + 0.1 * (s[-1] - s[0])
        xs = np.linspace(fit.u, top, 200)
        label = "generalised Pareto tail fit" + ("" if fit.sound else " (not sound: not used)")
        ax.plot(xs, [fit.rate_at(x) for x in xs], color=fg.VERMILLION, label=label)
    ax.axvline(result.thresholds.image_threshold, color=fg.CALIBRATED_COLOUR, linewidth=2,
               label=calibrated_label(result))
    ax.set_yscale("log")
    ax.set_ylim(min(target, 1.0 / (n + 1)) / 5, 1.0)
    fg.plain_log_ticks(ax.yaxis, percent=True)
    ax.set_xlabel("image score")
    ax.set_ylabel("share of good frames above (log scale)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Tail of the good scores: where the false alarms come from")
    fg.save(fig, path)
    return fig


def overlay_caption(label: str, score: float, n_regions: int, image_threshold: float, defective: bool = False) -> str:
    """Two lines: the frame, then what the agent would do with it and why."""
    if score <= image_threshold:
        return f"{label}\nscore {score:.4g}: " + ("not flagged (missed)" if defective else "not flagged")
    if n_regions == 0:
        return f"{label}\nscore {score:.4g}: FLAGGED\n({NO_REGION})"
    return f"{label}\nscore {score:.4g}: FLAGGED, {n_regions} region{'s' if n_regions != 1 else ''}"


def plot_overlays(items: Sequence[Tuple[str, np.ndarray, np.ndarray, float]], result: ThresholdsFit, title: str,
                  path: Path, vmin: float, vmax: float, defective: bool = False) -> Any:
    """A grid of frames with heat maps; outlines where the map is above the pixel threshold.
    defective: the frames show labelled defects (a frame below the threshold is a miss)."""
    import cv2

    t = result.thresholds
    cols = min(OVERLAY_COLUMNS, len(items))
    rows = int(np.ceil(len(items) / cols))
    fig = fg.new_figure(PANEL_INCHES * cols, (PANEL_INCHES + 0.6) * rows + 0.5)
    for i, (label, image, amap, score) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(fg.heat_overlay(image, amap, vmin, vmax))
        h, w = image.shape[:2]
        above = cv2.resize((amap > t.pixel_threshold).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        if above.any():
            ax.contour(above, levels=[0.5], colors=fg.REGION_OUTLINE, linewidths=1.5)
        n_regions = count_regions(amap, t.pixel_threshold, t.min_defect_area)
        flagged = score > t.image_threshold
        ax.set_title(overlay_caption(label, score, n_regions, t.image_threshold, defective), fontsize=7,
                     color=FLAG_COLOUR if flagged else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}\nheat scale {vmin:.3g} - {vmax:.3g}; sky-blue outline: map above the pixel threshold "
                 f"{t.pixel_threshold:.4g}; flagged: image score above {t.image_threshold:.4g}", fontsize=9)
    fg.save(fig, path)
    return fig


def frame_label(frame_file: str, source: str) -> str:
    """The source image's name, which a technician can find the part by; the capture's own frame file name only
    when there is no source (a camera) -- never both, which repeated the number ("000035.png (035.png)")."""
    name = Path(source).name if source else ""
    return name[-28:] if name else Path(frame_file).name


def _good_items(capture: Capture, n: int) -> List[Tuple[str, np.ndarray, np.ndarray, float]]:
    items = []
    for idx in np.argsort(-capture.scores)[:n]:
        try:
            image = read_image(Path(capture.root) / capture.frame_files[idx])
        except ImageError as exc:
            logger.warning("report: %s", exc)
            continue
        source = capture.source_names[idx] if idx < len(capture.source_names) else ""
        items.append((frame_label(capture.frame_files[idx], source), image, capture.maps[idx],
                      float(capture.scores[idx])))
    return items


def _missed_items(defects: DefectSet, threshold: float, n: int) -> List[Tuple[str, np.ndarray, np.ndarray, float]]:
    entries = [(float(s), kind, i) for kind in defects.scores for i, s in enumerate(defects.scores[kind]) if s <= threshold]
    items = []
    for score, kind, i in sorted(entries)[:n]:
        try:
            image = read_image(defects.files[kind][i])
        except ImageError as exc:
            logger.warning("report: %s", exc)
            continue
        items.append((f"{kind}/{Path(defects.files[kind][i]).name}", image, defects.maps[kind][i], score))
    return items


def write_report(result: ThresholdsFit, capture: Capture, out_dir: Union[str, Path],
                 defects: Optional[DefectSet] = None, thresholds_path: Optional[Path] = None) -> Path:
    """Write the plots, report.html and report.md into out_dir; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    good = capture.scores
    plot_histogram(result, good, defects, out / HISTOGRAM_PNG)
    plot_tail(result, good, out / TAIL_PNG)
    figures = [(HISTOGRAM_PNG, "Score histogram: good frames" + (" and labelled defects" if defects else "") +
                ", with the calibrated threshold the agent uses" + (" and the best-F1 one" if defects else "")),
               (TAIL_PNG, "Share of good frames above each score: the target rate, what N frames resolve, the calibrated "
                          "threshold")]
    # one heat scale for every overlay, so frames compare: from the typical good map to the threshold and above
    vmin = float(np.quantile(capture.maps, 0.5))
    vmax = max(result.thresholds.pixel_threshold, float(capture.maps.max())) * 1.05
    good_items = _good_items(capture, N_OVERLAYS)
    if good_items:
        plot_overlays(good_items, result, "Highest-scoring good frames", out / GOOD_OVERLAYS_PNG, vmin, vmax)
        figures.append((GOOD_OVERLAYS_PNG, "The highest-scoring good frames: where would false alarms come from? "
                                           "If one shows a real defect, the capture was not all good parts: capture again without it."))
    if defects is not None:
        missed = _missed_items(defects, result.thresholds.image_threshold, N_OVERLAYS)
        if missed:
            plot_overlays(missed, result, "Missed defects (lowest scores)", out / MISSED_OVERLAYS_PNG, vmin, vmax,
                          defective=True)
            figures.append((MISSED_OVERLAYS_PNG, "Labelled defects scoring below the threshold (missed)."))
    lines = summary_lines(result, capture)
    atomic_write_text(out / REPORT_HTML, _html(result, lines, figures, thresholds_path))
    atomic_write_text(out / REPORT_MD, _markdown(result, lines, figures, thresholds_path))
    return out / REPORT_HTML


def _html(result: ThresholdsFit, lines: List[str], figures: List[Tuple[str, str]], thresholds_path: Optional[Path]) -> str:
    t = result.thresholds
    rows = [("image threshold", f"{t.image_threshold:.6g}"), ("strategy", t.strategy),
            ("target false-alarm rate", pct(result.image.target)),
            ("expected false-alarm rate on new good parts", pct(result.at_chosen.expected_rate)),
            ("95% interval (exact binomial)", f"{pct(result.at_chosen.ci[0])} - {pct(result.at_chosen.ci[1])}"),
            ("pixel threshold", f"{t.pixel_threshold:.6g}"), ("min defect area", f"{t.min_defect_area} px"),
            ("good frames", str(t.n_frames)), ("bundle", f"{t.bundle_name} ({t.bundle_sha256[:12]})"),
            ("created", t.created)]
    if result.misses.get("all"):
        rows.append(("miss rate (labelled defects)", pct(result.misses["all"]["miss_rate"])))
    written = f"<p>Thresholds written to <code>{rh.esc(thresholds_path)}</code>.</p>" if thresholds_path else ""
    body = f"""<h1>Calibration report</h1>{written}
{rh.key_values(rows)}
{rh.warnings_box(result.warnings)}
<h2>Figures</h2>{rh.figures(figures)}
<h2>Summary</h2><pre>{rh.esc(chr(10).join(lines))}</pre>
<p>The false-alarm figures assume the good frames are independent samples of normal production; frames
of the same part taken in a burst are not, and make the interval look narrower than it is.</p>"""
    return rh.page(f"Calibration report: {t.bundle_name}", body)


def _markdown(result: ThresholdsFit, lines: List[str], figures: List[Tuple[str, str]], thresholds_path: Optional[Path]) -> str:
    out = ["# Calibration report", ""]
    if thresholds_path:
        out += [f"Thresholds written to `{thresholds_path}`.", ""]
    out += ["```", *lines, "```", ""]
    for name, caption in figures:
        out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(out)
