"""Check: a dry run of what the agent would flag with a thresholds file, on a folder of images.

Same preprocessing, backend and rules as the agent (engine.scoring, engine.regions): flagged when the
image score is above the image threshold; regions are components of the anomaly map above the pixel
threshold of at least the minimum area.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

import numpy as np

from engine.backend import open_backend
from engine.bundle import load_bundle
from engine.regions import count_regions, verdict
from engine.thresholds import Thresholds, load_thresholds

from . import stats
from .capture import image_folder, read_image_files, score_frames
from .fit import pct

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameCheck:
    name: str
    score: float
    flagged: bool
    regions: int


@dataclass
class CheckResult:
    thresholds: Thresholds
    frames: List[FrameCheck]
    skipped: List[str] = field(default_factory=list)

    @property
    def flagged(self) -> int:
        return sum(1 for f in self.frames if f.flagged)

    @property
    def with_regions(self) -> int:
        return sum(1 for f in self.frames if f.regions > 0)


def run_check(thresholds_path: Union[str, Path], bundle_path: Union[str, Path], images: Union[str, Path],
              backend: str = "auto", progress: bool = True, precision: str = "fp32") -> CheckResult:
    from tqdm import tqdm

    bundle = load_bundle(bundle_path)
    thresholds = load_thresholds(thresholds_path, bundle)  # refuses thresholds made for another bundle
    files = image_folder(images)
    skipped: List[str] = []
    frames: List[FrameCheck] = []
    with open_backend(bundle, prefer=backend, precision=precision) as be:
        for name, _, scored in tqdm(score_frames(read_image_files(files, skipped), bundle, be), total=len(files),
                                    desc="check", unit="frame", disable=None if progress else True):
            frames.append(FrameCheck(
                name=Path(name).name,
                score=scored.score,
                flagged=verdict(scored.score, [], thresholds).defective,
                regions=count_regions(scored.anomaly_map, thresholds.pixel_threshold, thresholds.min_defect_area),
            ))
    if skipped:
        logger.warning("%d unreadable image(s) skipped in %s", len(skipped), images)
    return CheckResult(thresholds=thresholds, frames=frames, skipped=skipped)


def check_lines(result: CheckResult, list_frames: bool = False) -> List[str]:
    t = result.thresholds
    n = len(result.frames)
    lines = []
    if list_frames:
        lines.append(f"{'frame':<32} {'score':>10}  verdict  regions")
        for f in result.frames:
            lines.append(f"{f.name:<32} {f.score:>10.5g}  {'FLAGGED' if f.flagged else 'ok':<7}  {f.regions}")
    lines.append(f"thresholds   image {t.image_threshold:.6g}, pixel {t.pixel_threshold:.6g}, min area {t.min_defect_area} px "
                 f"({t.strategy}, target {pct(t.target_false_alarm_rate) if t.target_false_alarm_rate else 'n/a'})")
    if n:
        scores = np.asarray([f.score for f in result.frames])
        lo, hi = stats.clopper_pearson(result.flagged, n)
        lines.append(f"flagged      {result.flagged} of {n} frames ({pct(result.flagged / n)}; "
                     f"95% interval {pct(lo)} - {pct(hi)} if these are all good parts)")
        lines.append(f"regions      {result.with_regions} of {n} frames show at least one region; "
                     f"{sum(f.regions for f in result.frames)} regions in all")
        lines.append(f"scores       median {np.median(scores):.5g}, max {scores.max():.5g}")
    if result.skipped:
        lines.append(f"skipped      {len(result.skipped)} unreadable image(s): {', '.join(result.skipped[:5])}"
                     + (" ..." if len(result.skipped) > 5 else ""))
    return lines
