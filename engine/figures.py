"""What every figure of the project shares: colours a colour-blind reader tells apart, a layout in which no title
overlaps an image, plain tick labels, one heat-map colouring. Used by train/plots.py and calibration/report.py.

matplotlib (and cv2, for the overlays) are imported lazily and figures are drawn through the Agg canvas without
pyplot: no display is needed and no global figure state leaks into the caller.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from .bundle import atomic_write_bytes
from .messages import pct

DPI = 110
# Okabe & Ito (2008), the palette made to stay distinct under the common colour-vision deficiencies.
BLUE, ORANGE, SKY_BLUE, GREEN, YELLOW, VERMILLION, PURPLE = (
    "#0072B2", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#D55E00", "#CC79A7")
GOOD_COLOUR = BLUE  # good parts: a filled histogram drawn first, behind the defects
# Defect types in this order; yellow last, as it is the faintest on white.
DEFECT_COLOURS = (ORANGE, VERMILLION, GREEN, PURPLE, SKY_BLUE, YELLOW)
DEFECT_LINESTYLES = ("-", "--", ":")  # a seventh type reuses the colours with another line style
CALIBRATED_COLOUR = "black"  # the threshold the agent uses
BEST_F1_COLOUR = "0.45"  # grey: the threshold chosen on labelled data
HEAT_CMAP = "inferno"  # perceptually ordered and legible in gray; jet is neither
TRUE_DEFECT_OUTLINE = SKY_BLUE  # the labelled mask, over the heat map (sky blue is absent from inferno)
REGION_OUTLINE = SKY_BLUE  # map pixels above the pixel threshold (white vanished on inferno's pale top)
OVERLAY_ALPHA_MAX = 0.8  # the heat map's weight over the frame where the map is hottest


def new_figure(width: float, height: float) -> Any:
    """A Figure with constrained layout, so titles, captions and legends never overlap the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    """PNG, written atomically (a report being read never shows half a figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def defect_styles(names: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """name -> {color, linestyle}: distinct for every defect type, in the order given."""
    n = len(DEFECT_COLOURS)
    return {name: {"color": DEFECT_COLOURS[i % n], "linestyle": DEFECT_LINESTYLES[(i // n) % len(DEFECT_LINESTYLES)]}
            for i, name in enumerate(names)}


def plain_log_ticks(axis: Any, percent: bool = False) -> None:
    """Tick labels on a log axis as plain numbers ("1", "5", "20") or rates ("1%", "0.5%"), not "6×10⁰"."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    label = FuncFormatter(lambda v, _: pct(v) if percent else f"{v:g}")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(label)
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    # counts span a decade or two: 2 and 5 labelled help; rates span several, where they would crowd
    axis.set_minor_formatter(NullFormatter() if percent else label)


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGB float in [0, 1]: the image in gray with the map as a heat map, at the image's resolution.

    image: gray or RGB, uint8/uint16 or float in [0, 1]."""
    import cv2
    import matplotlib

    scale = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 1.0
    gray = image.astype(np.float32) / scale
    if gray.ndim == 3:  # the channels' mean: RGB or BGR alike, any float dtype (cvtColor takes neither float64)
        gray = gray[:, :, :3].mean(axis=2)
    h, w = gray.shape[:2]
    heat = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    unit = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    coloured = matplotlib.colormaps[HEAT_CMAP](unit)[:, :, :3]
    # the colour's weight grows with the heat: a quiet map leaves the image as it is (inferno's dark low end
    # would otherwise dim the whole frame), a hot spot is drawn in full
    alpha = OVERLAY_ALPHA_MAX * unit[:, :, None]
    return np.clip((1 - alpha) * gray[:, :, None] + alpha * coloured, 0, 1)
