"""The calibration report a person reads: PNG plots, report.html tying them together, report.md.

matplotlib is imported here only, lazily, and drawn through the Agg canvas without pyplot, so no
display is needed and no global figure state leaks into the caller.
"""
from __future__ import annotations

import html
import io
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.bundle import atomic_write_bytes, atomic_write_text
from engine.errors import ImageError
from engine.preprocess import read_image

from . import stats
from .capture import Capture
from .fit import DefectSet, FitResult, pct, summary_lines

logger = logging.getLogger(__name__)

HISTOGRAM_PNG = "histogram.png"
TAIL_PNG = "tail.png"
GOOD_OVERLAYS_PNG = "good_overlays.png"
MISSED_OVERLAYS_PNG = "missed_defects.png"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
N_OVERLAYS = 8  # highest-scoring good frames (and lowest-scoring defects) shown
OVERLAY_COLUMNS = 4
OVERLAY_ALPHA = 0.45  # heat map over the frame: enough to see both
HIST_BINS = 50
DPI = 110
PANEL_INCHES = 3.0
GOOD_COLOR = "tab:blue"
THRESHOLD_COLOR = "black"  # not in tab10, which colours the defect types
FLAG_COLOR = "tab:red"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_histogram(result: FitResult, good: np.ndarray, defects: Optional[DefectSet], path: Path) -> None:
    """Good (and defect) score histograms with the threshold lines and the expected rates."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    values = [good] + ([defects.scores[k] for k in sorted(defects.scores)] if defects else [])
    lo, hi = float(min(v.min() for v in values)), float(max(v.max() for v in values))
    hi = max(hi, result.thresholds.image_threshold)
    bins = np.linspace(lo, hi + 1e-9 + (hi - lo) * 0.02, HIST_BINS + 1)
    ax.hist(good, bins=bins, color=GOOD_COLOR, alpha=0.6, label=f"good frames (n={good.size})")
    if defects:
        cmap = _cmap("tab10")
        for i, kind in enumerate(sorted(defects.scores)):
            ax.hist(defects.scores[kind], bins=bins, histtype="step", linewidth=1.6, color=cmap(1 + i % 9),
                    label=f"defect: {kind} (n={defects.scores[kind].size})")
    t = result.thresholds
    ax.axvline(t.image_threshold, color=THRESHOLD_COLOR, linewidth=2,
               label=f"threshold {t.image_threshold:.4g} ({t.strategy})")
    if result.best_f1 is not None and abs(result.best_f1.threshold - t.image_threshold) > 0:
        ax.axvline(result.best_f1.threshold, color="0.35", linestyle="--", label=f"best F1 {result.best_f1.threshold:.4g}")
    if result.at_chosen.strategy == "best_f1":
        ax.axvline(result.image.threshold, color="0.35", linestyle=":",
                   label=f"target-rate threshold {result.image.threshold:.4g}")
    ax.set_yscale("log")  # the tail, where the threshold sits, is a handful of frames
    ax.set_xlabel("image score")
    ax.set_ylabel("frames (log scale)")
    c = result.at_chosen
    text = [f"expected false-alarm rate {pct(c.expected_rate)}", f"95% interval {pct(c.ci[0])} - {pct(c.ci[1])}"]
    if result.misses.get("all"):
        text.append(f"miss rate {pct(result.misses['all']['miss_rate'])}")
    ax.text(0.02, 0.97, "\n".join(text), transform=ax.transAxes, va="top", fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Image scores: {t.bundle_name}, target false-alarm rate {pct(result.image.target)}")
    _save(fig, path)


def plot_tail(result: FitResult, good: np.ndarray, path: Path) -> None:
    """Exceedance curve of the good scores (log), the target, the threshold and the tail fit if any."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    s = np.sort(good)
    n = s.size
    exceed = (n - np.arange(n)) / (n + 1.0)  # P(score > s_i) estimated without reaching 0 at the maximum
    ax.step(s, exceed, where="post", color=GOOD_COLOR, label="good frames (empirical)")
    target = result.image.target
    ax.axhline(target, color="0.4", linestyle=":", label=f"target {pct(target)}")
    ax.axhline(stats.RULE_OF_THREE / n, color="0.7", linestyle="--", label=f"resolution of {n} frames (3/N)")
    gpd = result.image.gpd
    if gpd and gpd.get("scale", 0) > 0 and gpd.get("zeta", 0) > 0:
        fit = stats.GpdFit(u=gpd["u"], zeta=gpd["zeta"], shape=gpd["shape"], scale=gpd["scale"],
                           n_exceed=gpd["n_exceed"], gof_pvalue=gpd["gof_pvalue"], problems=tuple(gpd["problems"]))
        top = max(result.thresholds.image_threshold, s[-1]) + 0.1 * (s[-1] - s[0])
        xs = np.linspace(fit.u, top, 200)
        label = "generalised Pareto tail fit" + ("" if fit.sound else " (not sound: not used)")
        ax.plot(xs, [fit.rate_at(x) for x in xs], color="tab:purple", label=label)
    ax.axvline(result.thresholds.image_threshold, color=THRESHOLD_COLOR, linewidth=2,
               label=f"threshold {result.thresholds.image_threshold:.4g}")
    ax.set_yscale("log")
    ax.set_ylim(min(target, 1.0 / (n + 1)) / 5, 1.0)
    ax.set_xlabel("image score")
    ax.set_ylabel("share of good frames above (log)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Tail of the good scores: where the false alarms come from")
    _save(fig, path)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGB uint8: the frame in gray with the anomaly map as a heat map, at the frame's resolution."""
    import cv2

    gray = image if image.ndim == 2 else cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    if gray.dtype != np.uint8:
        gray = (gray.astype(np.float32) / np.iinfo(gray.dtype).max * 255).astype(np.uint8)
    h, w = gray.shape[:2]
    heat = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    unit = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colored = (_cmap("jet")(unit)[:, :, :3] * 255).astype(np.float32)
    base = np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32)
    return np.clip((1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colored, 0, 255).astype(np.uint8)


def plot_overlays(items: Sequence[Tuple[str, np.ndarray, np.ndarray, float]], result: FitResult, title: str,
                  path: Path, vmin: float, vmax: float) -> None:
    """A grid of frames with heat maps; contours where the map is above the pixel threshold."""
    import cv2

    t = result.thresholds
    cols = min(OVERLAY_COLUMNS, len(items))
    rows = int(np.ceil(len(items) / cols))
    fig = _figure(PANEL_INCHES * cols, PANEL_INCHES * rows + 0.6)
    for i, (label, image, amap, score) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(overlay(image, amap, vmin, vmax))
        h, w = image.shape[:2]
        above = cv2.resize((amap > t.pixel_threshold).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        if above.any():
            ax.contour(above, levels=[0.5], colors="white", linewidths=1.0)
        n_regions = stats.count_regions(amap, t.pixel_threshold, t.min_defect_area)
        verdict = "FLAGGED" if score > t.image_threshold else "ok"
        ax.set_title(f"{label}\nscore {score:.4g} {verdict}, {n_regions} region(s)", fontsize=8,
                     color=FLAG_COLOR if verdict == "FLAGGED" else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (heat scale {vmin:.3g} - {vmax:.3g}; white: above pixel threshold {t.pixel_threshold:.4g})",
                 fontsize=9)
    _save(fig, path)


def _good_items(capture: Capture, n: int) -> List[Tuple[str, np.ndarray, np.ndarray, float]]:
    items = []
    for idx in np.argsort(-capture.scores)[:n]:
        try:
            image = read_image(Path(capture.root) / capture.frame_files[idx])
        except ImageError as exc:
            logger.warning("report: %s", exc)
            continue
        label = Path(capture.frame_files[idx]).name
        source = Path(capture.source_names[idx]).name if idx < len(capture.source_names) else ""
        if source and source != label:
            label = f"{label} ({source[-24:]})"  # the original name, so a technician can find the part
        items.append((label, image, capture.maps[idx], float(capture.scores[idx])))
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


def write_report(result: FitResult, capture: Capture, out_dir: Union[str, Path],
                 defects: Optional[DefectSet] = None, thresholds_path: Optional[Path] = None) -> Path:
    """Write the plots, report.html and report.md into out_dir; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    good = capture.scores
    plot_histogram(result, good, defects, out / HISTOGRAM_PNG)
    plot_tail(result, good, out / TAIL_PNG)
    figures = [(HISTOGRAM_PNG, "Score histogram: good frames" + (" and labelled defects" if defects else "") +
                ", with the threshold"),
               (TAIL_PNG, "Share of good frames above each score: the target rate, what N frames resolve, the threshold")]
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
            plot_overlays(missed, result, "Missed defects (lowest scores)", out / MISSED_OVERLAYS_PNG, vmin, vmax)
            figures.append((MISSED_OVERLAYS_PNG, "Labelled defects scoring below the threshold (missed)."))
    lines = summary_lines(result, capture)
    atomic_write_text(out / REPORT_HTML, _html(result, lines, figures, thresholds_path))
    atomic_write_text(out / REPORT_MD, _markdown(result, lines, figures, thresholds_path))
    return out / REPORT_HTML


def _html(result: FitResult, lines: List[str], figures: List[Tuple[str, str]], thresholds_path: Optional[Path]) -> str:
    t = result.thresholds
    rows = [("image threshold", f"{t.image_threshold:.6g}"), ("strategy", t.strategy),
            ("target false-alarm rate", pct(result.image.target)),
            ("expected false-alarm rate", pct(result.at_chosen.expected_rate)),
            ("95% interval (exact binomial)", f"{pct(result.at_chosen.ci[0])} - {pct(result.at_chosen.ci[1])}"),
            ("pixel threshold", f"{t.pixel_threshold:.6g}"), ("min defect area", f"{t.min_defect_area} px"),
            ("good frames", str(t.n_frames)), ("bundle", f"{t.bundle_name} ({t.bundle_sha256[:12]})"),
            ("created", t.created)]
    if result.misses.get("all"):
        rows.append(("miss rate (labelled defects)", pct(result.misses["all"]["miss_rate"])))
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result.warnings)
    figs = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in figures)
    written = f"<p>Thresholds written to <code>{html.escape(str(thresholds_path))}</code>.</p>" if thresholds_path else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Calibration report: {html.escape(t.bundle_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.warn{{background:#fff4e0;border:1px solid #e0a040;padding:0.5em 1em}}img{{max-width:100%}}
figure{{margin:1.5em 0}}figcaption{{color:#444}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head>
<body><h1>Calibration report</h1>{written}
<table>{table}</table>
{f'<div class="warn"><h2>Warnings</h2><ul>{warnings}</ul></div>' if warnings else ''}
<h2>Figures</h2>{figs}
<h2>Summary</h2><pre>{html.escape(chr(10).join(lines))}</pre>
<p>The false-alarm figures assume the good frames are independent samples of normal production; frames
of the same part taken in a burst are not, and make the interval look narrower than it is.</p>
</body></html>
"""


def _markdown(result: FitResult, lines: List[str], figures: List[Tuple[str, str]], thresholds_path: Optional[Path]) -> str:
    out = ["# Calibration report", ""]
    if thresholds_path:
        out += [f"Thresholds written to `{thresholds_path}`.", ""]
    out += ["```", *lines, "```", ""]
    for name, caption in figures:
        out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(out)
