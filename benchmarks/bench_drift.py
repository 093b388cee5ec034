"""The drift alarm on a long synthetic run: its delay after a shift, its spurious alarms without one.

Good-part scores are drawn from a fixed distribution (log-normal: right-skewed like anomaly scores).
A calibration of --calibration-frames frames sets the image threshold at --false-alarm-rate and the
drift reference (calibration.stats.drift_reference), exactly as `daad-calibrate fit` writes them; the
agent's DriftMonitor (agent.drift) is then fed the scores of the frames judged good:
  - spurious: --unchanged frames from the same distribution; every entry into `recalibrate` (and into
    `warning`) is counted. One row with the reference at its true value (the design's condition), one per
    calibration size, the frames split over --calibrations site calibrations of that size (what sites get);
  - delay: after 2 x window unchanged frames the scores move up (log-scale shift) so that the false-alarm
    rate at the image threshold doubles; frames from the shift to the first `recalibrate`, over --trials
    (each trial with its own calibration).
Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/bench_drift.py        # 1 000 000 unchanged frames and 200 trials per row (~4 min on 1 core)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import DriftConfig  # noqa: E402
from agent.drift import DRIFT_RECALIBRATE, DRIFT_WARNING, DriftMonitor, DriftReference  # noqa: E402
from calibration import stats  # noqa: E402

SIGMA = 0.5  # log-normal shape of the synthetic good scores
SEED = 0


def monitor(cfg: DriftConfig, ref: DriftReference) -> DriftMonitor:
    return DriftMonitor(cfg.window, cfg.interval, cfg.alarm_per_frames, cfg.warning_per_frames, ref)


def feed(mon: DriftMonitor, scores: np.ndarray, threshold: float) -> Dict[str, int]:
    """Entries into warning / recalibrate over the good-judged frames of `scores`."""
    entries = {DRIFT_WARNING: 0, DRIFT_RECALIBRATE: 0}
    for s in scores[scores <= threshold].tolist():
        if mon.add(s) and mon.state in entries:
            entries[mon.state] += 1
    return entries


def true_reference(threshold: float, level: float) -> DriftReference:
    """The reference a calibration of infinitely many frames would write (the design's condition)."""
    from scipy import stats as st

    dist = st.lognorm(SIGMA)
    below = dist.cdf(threshold)
    score = float(dist.ppf(level * below))
    n = 10**9
    return DriftReference(level=level, score=score, above=int(round((1 - level) * n)) - 1, n_frames=n - 1)


def calibrate(dist: Any, n: int, rate: float, rng: np.random.Generator) -> Tuple[float, DriftReference]:
    """One site calibration of n frames: its image threshold and drift reference, as `daad-calibrate fit`."""
    cal = dist.rvs(size=n, random_state=rng)
    thr = float(np.quantile(cal, 1 - rate))
    return thr, DriftReference(**stats.drift_reference(cal, thr, stats.DRIFT_REFERENCE_LEVEL))


def spurious(cfg: DriftConfig, dist: Any, frames: int, reference: Callable[[], Tuple[float, DriftReference]],
             runs: int, rng: np.random.Generator) -> Dict[str, Any]:
    total = {DRIFT_WARNING: 0, DRIFT_RECALIBRATE: 0}
    per_run = frames // runs
    for _ in range(runs):
        thr, ref = reference()
        e = feed(monitor(cfg, ref), dist.rvs(size=per_run, random_state=rng), thr)
        for k in total:
            total[k] += e[k]
    n = per_run * runs
    return {"frames": n, "runs": runs, "recalibrate": total[DRIFT_RECALIBRATE], "warning": total[DRIFT_WARNING],
            "per_100k": total[DRIFT_RECALIBRATE] * 1e5 / n}


def delays(cfg: DriftConfig, dist: Any, shift: float, reference: Callable[[], Tuple[float, DriftReference]],
           trials: int, max_delay: int, rng: np.random.Generator) -> Dict[str, Any]:
    """Frames (all frames, good-judged or not) from the shift to the first `recalibrate`."""
    found: List[int] = []
    missed = 0
    for _ in range(trials):
        thr, ref = reference()
        mon = monitor(cfg, ref)
        feed(mon, dist.rvs(size=2 * cfg.window, random_state=rng), thr)
        shifted = dist.rvs(size=max_delay, random_state=rng) * np.exp(shift)
        delay = -1
        for i, s in enumerate(shifted.tolist()):
            if s <= thr and mon.add(s) and mon.state == DRIFT_RECALIBRATE:
                delay = i + 1
                break
        if delay < 0:
            missed += 1
        else:
            found.append(delay)
    f = np.array(found)
    return {"trials": trials, "missed_within": max_delay, "missed": missed,
            "median": float(np.median(f)) if f.size else None,
            "p95": float(np.quantile(f, 0.95)) if f.size else None,
            "within_500": float(np.sum(f <= 500) / trials)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from scipy import stats as st

    cfg = DriftConfig()
    rng = np.random.default_rng(SEED)
    dist = st.lognorm(SIGMA)
    rate = args.false_alarm_rate
    threshold = float(dist.ppf(1 - rate))  # the true-rate threshold
    shift = float(np.log(threshold) - np.log(dist.ppf(1 - 2 * rate)))  # log-score shift that doubles the rate
    out: Dict[str, Any] = {"config": cfg.model_dump(), "reference_level": stats.DRIFT_REFERENCE_LEVEL,
                           "false_alarm_rate": rate, "score_distribution": f"lognormal(sigma={SIGMA})",
                           "shift_log": shift, "rows": []}
    t0 = time.perf_counter()
    refs: Dict[str, Callable[[], Tuple[float, DriftReference]]] = {
        "known (design)": lambda: (threshold, true_reference(threshold, stats.DRIFT_REFERENCE_LEVEL))}
    for n in args.calibration_frames:
        refs[f"calibrated on {n}"] = (lambda n=n: calibrate(dist, n, rate, rng))
    for name, ref in refs.items():
        runs = 1 if name.startswith("known") else args.calibrations
        row = {"reference": name, "spurious": spurious(cfg, dist, args.unchanged, ref, runs, rng),
               "delay": delays(cfg, dist, shift, ref, args.trials, args.max_delay, rng)}
        out["rows"].append(row)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unchanged", type=int, default=1_000_000, help="unchanged frames for the spurious-alarm count")
    ap.add_argument("--calibrations", type=int, default=20, help="site calibrations the unchanged frames are split over")
    ap.add_argument("--calibration-frames", type=int, nargs="+", default=[300, 1000, 3000],
                    help="good frames per site calibration (one row each)")
    ap.add_argument("--false-alarm-rate", type=float, default=0.01)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--max-delay", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    res = run(args)
    c = res["config"]
    print(f"drift alarm: window {c['window']}, a test every {c['interval']} good frames, reference "
          f"p{res['reference_level'] * 100:g}, per-test levels {c['interval']}/{c['alarm_per_frames']} (recalibrate), "
          f"{c['interval']}/{c['warning_per_frames']} (warning); scores {res['score_distribution']}, shift doubling "
          f"the {res['false_alarm_rate']:.0%} false-alarm rate")
    print(f"{'reference':<20} {'unchanged':>10} {'recal.':>6} {'/100k':>6} {'warn.':>6} | "
          f"{'delay median':>12} {'p95':>6} {'<=500':>6} {'missed':>6}")
    for r in res["rows"]:
        sp, d = r["spurious"], r["delay"]
        print(f"{r['reference']:<20} {sp['frames']:>10} {sp['recalibrate']:>6} {sp['per_100k']:>6.2f} {sp['warning']:>6} | "
              f"{d['median']:>12.0f} {d['p95']:>6.0f} {d['within_500']:>6.0%} {d['missed']:>6}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench_drift-{stamp}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
