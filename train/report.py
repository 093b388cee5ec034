"""The evaluation report a trainer reads: report.html beside metrics.json and the plots of `daad-train eval`,
built from the same pieces as the calibration report (engine.report_html).

The calibrated threshold comes from thresholds.yaml read by its one owner, engine.thresholds (the agent's reader), so
a file the agent would refuse is refused here with the same message.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engine import report_html as rh
from engine.bundle import atomic_write_text
from engine.messages import pct
from engine.thresholds import load_thresholds

from .metrics import AUPRO_FPR_LIMIT
from .plots import Threshold

REPORT_HTML = "report.html"


def best_f1_threshold(value: float) -> Threshold:
    return Threshold(value, f"best-F1 threshold {value:.4g} (on these labelled images)", inclusive=True)


def calibrated_threshold(path: Path) -> Threshold:
    """The image threshold the agent uses, from thresholds.yaml; ThresholdsError naming the file, field and fix.
    Not bound to a bundle: `daad-train eval` scores a checkpoint, which has no bundle digest."""
    thresholds = load_thresholds(path)
    value = thresholds.image_threshold
    return Threshold(value, f"calibrated threshold {value:.4g} (the agent's, {Path(path).name})", calibrated=True)


def caught_counts(scores: Sequence[float], types: Sequence[str], threshold: Threshold) -> Dict[str, Tuple[int, int]]:
    """type -> (flagged by the threshold, images): defects caught, or good images flagged (false alarms)."""
    out: Dict[str, Tuple[int, int]] = {}
    for score, kind in zip(scores, types):
        above, n = out.get(kind, (0, 0))
        out[kind] = (above + int(threshold.flags(score)), n + 1)
    return out


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def per_type_rows(metrics: Dict[str, Any], counts: Dict[str, Tuple[int, int]]) -> List[List[str]]:
    """One row per defect type, then the good images: images, image AUROC, pixel AUROC, what the threshold does."""
    pixel = metrics.get("pixel_auroc_breakdown", {}).get("per_type", {})
    rows = []
    for kind, auroc in metrics["image_auroc_per_type"].items():
        above, n = counts.get(kind, (0, 0))
        rows.append([kind, str(n), _num(auroc), _num(pixel.get(kind)), f"{above} of {n} caught"])
    flagged, n_good = counts.get("good", (0, 0))
    rows.append(["good", str(n_good), "", "", f"{flagged} of {n_good} flagged (false alarms)"])
    return rows


def write_report(out_dir: Path, metrics: Dict[str, Any], figures: Sequence[Tuple[str, str]],
                 counts: Dict[str, Tuple[int, int]], threshold: Threshold,
                 calibrated: Optional[Threshold] = None) -> Path:
    """report.html in out_dir; figures: (PNG file name in out_dir, caption)."""
    f1 = metrics["best_f1"]
    rows = [("model", str(metrics["model"])), ("data", f"{metrics['data']} (split {metrics['split']})"),
            ("images", f"{metrics['n_good']} good, {metrics['n_defective']} defective"),
            ("image AUROC", _num(metrics["image_auroc"])), ("pixel AUROC", _num(metrics["pixel_auroc"])),
            (f"AUPRO (up to {pct(AUPRO_FPR_LIMIT)} false-positive rate)", _num(metrics["aupro"])),
            ("best F1 on these images", f"{_num(f1['f1'])} at threshold {f1['threshold']:.4g} "
                                        f"(precision {_num(f1['precision'])}, recall {_num(f1['recall'])})")]
    if calibrated is not None:
        rows.append(("calibrated threshold (the agent's)", f"{calibrated.value:.4g}"))
    notes = []
    if metrics.get("transplant"):
        notes.append("Defects were pasted onto good images of the set (--transplant), not scored as photographed.")
    if metrics.get("groups"):
        notes.append(f"Only parts held out by {metrics['groups']} were scored (grouped protocol).")
    body = f"""<h1>Evaluation report: {rh.esc(metrics['model'])}</h1>
{rh.key_values(rows)}
{''.join(f'<p>{rh.esc(n)}</p>' for n in notes)}
<h2>Per defect type</h2>
<p>The last column counts the images the {rh.esc(threshold.label)} flags.</p>
{rh.grid(["type", "images", "image AUROC", "pixel AUROC", "at the threshold"], per_type_rows(metrics, counts))}
<h2>Figures</h2>{rh.figures(figures)}"""
    path = Path(out_dir) / REPORT_HTML
    atomic_write_text(path, rh.page(f"Evaluation report: {metrics['model']}", body))
    return path
