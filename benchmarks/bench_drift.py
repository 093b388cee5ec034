"""The drift alarm on a long synthetic run: its delay after a shift, its spurious alarms without one.

Good-part scores are drawn from a fixed distribution (log-normal: right-skewed like anomaly scores; the alarm
works on ranks, so any continuous distribution gives the same figures). A calibration of --calibration-frames
frames sets the image threshold at --false-alarm-rate and the drift reference
(calibration.stats.drift_reference), exactly as `daad-calibrate fit` writes them; the agent's DriftMonitor
(agent.drift, default config) is then fed the scores of the frames judged good:
  - spurious: --unchanged frames from the same distribution, split over --calibrations site calibrations of that
    size (the level is averaged over calibrations, as designed); crossings of the alarm limit (what the design
    bounds: <= 1 per alarm_per_frames) and entries into `recalibrate` / `warning` (what a site sees) are counted.
    The first row takes the reference as known (the true distribution's quantiles, the design's condition);
  - delay: after 2 x window unchanged frames the scores move up (log-scale shift) so that the false-alarm
    rate at the image threshold doubles; frames (good-judged or not) from the shift to the alarm's next crossing,
    over --trials (each trial with its own calibration).
Rows "calibrated on N (+B line frames)" run the agent's baseline extension (drift.baseline_frames = B): the
monitor pools its first B good frames with the calibration's reference and restarts on the pool. Their spurious
count covers every frame of each calibration's share, the baseline period included; their delay is measured from a
shift that starts 2 x window frames after the switch to the pool, and (delay_during_baseline) from a shift at frame
--shift-during (during the baseline: the calibration's CUSUM has to catch it, or the pool takes drifted frames).
Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/bench_drift.py     # 10 000 000 unchanged frames (1000 calibrations) and 1000 trials per row (~5 min, 1 core)
    python benchmarks/bench_drift.py --skip-known --calibration-frames 300 1000 --baseline-frames 3000   # the extension
    python benchmarks/bench_drift.py --grid --trials 600 --calibration-frames 300 1000 3000   # how k's constants were picked
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import DriftConfig  # noqa: E402
from benchmarks.protocol import write_results  # noqa: E402
from agent.drift import (  # noqa: E402
    DRIFT_RECALIBRATE,
    DRIFT_WARNING,
    SOURCE_POOLED,
    DriftMonitor,
    DriftReference,
    reference_from_dict,
)
from calibration import stats  # noqa: E402
from engine import drift_reference as drift_format  # noqa: E402

SIGMA = 0.5  # log-normal shape of the synthetic good scores
SEED = 0
KNOWN_FRAMES = 10**9  # the "known" reference: its calibration noise (1 / sqrt(n)) is nil


def monitor(cfg: DriftConfig, ref: DriftReference, baseline: int = 0) -> DriftMonitor:
    return DriftMonitor(cfg.window, cfg.alarm_per_frames, cfg.warning_per_frames, ref, cfg.detect_false_alarm_ratio,
                        baseline_frames=baseline)


def feed(mon: DriftMonitor, scores: np.ndarray, threshold: float) -> Dict[str, int]:
    """Entries into warning / recalibrate over the good-judged frames of `scores`."""
    entries = {DRIFT_WARNING: 0, DRIFT_RECALIBRATE: 0}
    for s in scores[scores <= threshold].tolist():
        if mon.add(s) and mon.state in entries:
            entries[mon.state] += 1
    return entries


def true_reference(threshold: float, rate: float) -> DriftReference:
    """The reference a calibration of infinitely many frames would write (the design's condition)."""
    from scipy import stats as st

    dist = st.lognorm(SIGMA)
    below = dist.cdf(threshold)
    levels = np.asarray(drift_format.levels(drift_format.MAX_QUANTILES))
    return DriftReference(n_frames=KNOWN_FRAMES, false_alarm_rate=rate,
                          quantiles=tuple(float(v) for v in dist.ppf(levels * below)))


def calibrate(dist: Any, n: int, rate: float, rng: np.random.Generator) -> Tuple[float, DriftReference]:
    """One site calibration of n frames: its image threshold and drift reference, as `daad-calibrate fit`."""
    cal = dist.rvs(size=n, random_state=rng)
    thr = float(np.quantile(cal, 1 - rate))
    return thr, reference_from_dict(stats.drift_reference(cal, thr, rate))


def spurious(cfg: DriftConfig, dist: Any, frames: int, reference: Callable[[], Tuple[float, DriftReference]],
             runs: int, rng: np.random.Generator, baseline: int = 0) -> Dict[str, Any]:
    total = {DRIFT_WARNING: 0, DRIFT_RECALIBRATE: 0}
    crossings = 0
    per_run = frames // runs
    limits: List[float] = []
    pooled = restarts = 0
    for _ in range(runs):
        thr, ref = reference()
        mon = monitor(cfg, ref, baseline)
        e = feed(mon, dist.rvs(size=per_run, random_state=rng), thr)
        crossings += mon.alarms
        limits.append(mon.design.limit)
        pooled += mon.source == SOURCE_POOLED
        restarts += mon.baseline_restarts
        for k in total:
            total[k] += e[k]
    n = per_run * runs
    lo, hi = poisson_ci(crossings)
    return {"frames": n, "runs": runs, "crossings": crossings, "per_100k_ci95": [lo * 1e5 / n, hi * 1e5 / n], "recalibrate": total[DRIFT_RECALIBRATE],
            "warning": total[DRIFT_WARNING], "per_100k": crossings * 1e5 / n,
            "recalibrate_per_100k": total[DRIFT_RECALIBRATE] * 1e5 / n, "warning_per_100k": total[DRIFT_WARNING] * 1e5 / n,
            "limit_median": float(np.median(limits)), "runs_pooled": pooled, "baseline_restarts": restarts}


def poisson_ci(count: int) -> Tuple[float, float]:
    """Exact (Garwood) 95 % interval of a Poisson mean from one count."""
    from scipy import stats as st

    lo = 0.0 if count == 0 else float(st.chi2.ppf(0.025, 2 * count) / 2)
    return lo, float(st.chi2.ppf(0.975, 2 * count + 2) / 2)


def delays(cfg: DriftConfig, dist: Any, shift: float, reference: Callable[[], Tuple[float, DriftReference]],
           trials: int, max_delay: int, rng: np.random.Generator, baseline: int = 0,
           shift_at: int = -1) -> Dict[str, Any]:
    """Frames (all frames, good-judged or not) from the shift to the alarm's next crossing. With a baseline: the
    shift starts 2 x window frames after the switch to the pool, or at frame shift_at (>= 0) whatever the switch."""
    found: List[int] = []
    missed = 0
    k = []
    pooled_before = pooled_after = 0
    for _ in range(trials):
        thr, ref = reference()
        mon = monitor(cfg, ref, baseline)
        if shift_at >= 0:
            feed(mon, dist.rvs(size=shift_at, random_state=rng), thr)
        else:
            for _tries in range(20):  # until the pool (a baseline restarted by a spurious alarm takes longer)
                if mon.source == SOURCE_POOLED or not baseline:
                    break
                feed(mon, dist.rvs(size=baseline, random_state=rng), thr)
            feed(mon, dist.rvs(size=2 * cfg.window, random_state=rng), thr)
        k.append(mon.design.k)
        pooled_before += mon.source == SOURCE_POOLED
        before = mon.alarms
        shifted = dist.rvs(size=max_delay, random_state=rng) * np.exp(shift)
        delay = -1
        for i, s in enumerate(shifted.tolist()):
            if s <= thr:
                mon.add(s)
                if mon.alarms > before:
                    delay = i + 1
                    break
        if delay < 0:
            missed += 1
        else:
            found.append(delay)
        pooled_after += mon.source == SOURCE_POOLED
    f = np.array(found + [max_delay + 1] * missed)  # a miss counts as later than every measured delay
    return {"trials": trials, "missed_within": max_delay, "missed": missed, "median": float(np.median(f)),
            "p95": float(np.quantile(f, 0.95)), "within_500": float(np.mean(f <= 500)), "k_median": float(np.median(k)),
            "shift_at": shift_at, "pooled_at_shift": pooled_before, "pooled_at_alarm": pooled_after}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from scipy import stats as st

    cfg = DriftConfig()
    rng = np.random.default_rng(SEED)
    dist = st.lognorm(SIGMA)
    rate = args.false_alarm_rate
    threshold = float(dist.ppf(1 - rate))  # the true-rate threshold
    shift = float(np.log(threshold) - np.log(dist.ppf(1 - 2 * rate)))  # log-score shift that doubles the rate
    out: Dict[str, Any] = {"config": cfg.model_dump(), "false_alarm_rate": rate,
                           "score_distribution": f"lognormal(sigma={SIGMA})", "shift_log": shift, "rows": [],
                           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    known = true_reference(threshold, rate)
    refs: List[Tuple[str, Callable[[], Tuple[float, DriftReference]], int]] = []
    if not args.skip_known:
        refs.append(("known (design)", lambda: (threshold, known), 0))
    for n in args.calibration_frames:
        if not args.skip_plain:
            refs.append((f"calibrated on {n}", lambda n=n: calibrate(dist, n, rate, rng), 0))
        if args.baseline_frames:
            refs.append((f"calibrated on {n} (+{args.baseline_frames} line frames)",
                         lambda n=n: calibrate(dist, n, rate, rng), args.baseline_frames))
    for name, ref, base in refs:
        runs = 1 if name.startswith("known") else args.calibrations
        row = {"reference": name, "baseline_frames": base,
               "spurious": spurious(cfg, dist, args.unchanged, ref, runs, rng, base),
               "delay": delays(cfg, dist, shift, ref, args.trials, args.max_delay, rng, base)}
        if base:
            row["delay_during_baseline"] = delays(cfg, dist, shift, ref, args.trials, args.max_delay, rng, base,
                                                  shift_at=args.shift_during)
        out["rows"].append(row)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    return out


def grid(args: argparse.Namespace) -> Dict[str, Any]:
    """Delays only, over the allowance's two constants (agent.cusum K_SHIFT_SHARE, K_CALIBRATION): how they were
    picked. The level holds for any of them (h is solved for it)."""
    from scipy import stats as st

    from agent import cusum

    cfg = DriftConfig()
    dist = st.lognorm(SIGMA)
    rate = args.false_alarm_rate
    threshold = float(dist.ppf(1 - rate))
    shift = float(np.log(threshold) - np.log(dist.ppf(1 - 2 * rate)))
    saved = cusum.K_SHIFT_SHARE, cusum.K_CALIBRATION
    cells = []
    try:
        for calib in (0.5, 0.8, 1.25, 1.75):
            for share in (0.3, 0.375, 0.5):
                cusum.K_SHIFT_SHARE, cusum.K_CALIBRATION = share, calib
                cusum.design.cache_clear()
                cell: Dict[str, Any] = {"k_shift_share": share, "k_calibration": calib}
                for n in args.calibration_frames:
                    rng = np.random.default_rng(SEED)
                    cell[str(n)] = delays(cfg, dist, shift, lambda n=n, rng=rng: calibrate(dist, n, rate, rng),
                                          args.trials, args.max_delay, rng)
                cells.append(cell)
                print(f"share {share:<5} calibration {calib:<4} " + " ".join(
                    f"n {n}: {cell[str(n)]['within_500']:.1%} (median {cell[str(n)]['median']:.0f})"
                    for n in args.calibration_frames), flush=True)
    finally:
        cusum.K_SHIFT_SHARE, cusum.K_CALIBRATION = saved
        cusum.design.cache_clear()
    return {"grid": cells, "false_alarm_rate": rate, "trials": args.trials, "chosen": list(saved)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unchanged", type=int, default=10_000_000, help="unchanged frames per row for the spurious count")
    ap.add_argument("--calibrations", type=int, default=1000, help="site calibrations the unchanged frames are split over")
    ap.add_argument("--calibration-frames", type=int, nargs="+", default=[300, 1000, 3000, 10000],
                    help="good frames per site calibration (one row each)")
    ap.add_argument("--false-alarm-rate", type=float, default=0.01)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--max-delay", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--baseline-frames", type=int, default=3000,
                    help="rows with the baseline extension (drift.baseline_frames) for each calibration size; 0: none")
    ap.add_argument("--shift-during", type=int, default=1000, help="frame of the shift inside the baseline")
    ap.add_argument("--skip-known", action="store_true", help="leave out the known-reference row")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the rows without the extension")
    ap.add_argument("--grid", action="store_true", help="only the delays over a grid of the allowance's constants")
    args = ap.parse_args()
    if args.grid:
        write_results(args.out, "bench_drift-grid-", grid(args))
        return 0
    res = run(args)
    c = res["config"]
    print(f"drift alarm: CUSUM of good frames' normal scores, detect a {c['detect_false_alarm_ratio']:g}x false-alarm rate "
          f"(from {res['false_alarm_rate']:.0%}), <= 1 spurious recalibrate per {c['alarm_per_frames']} frames, warning per "
          f"{c['warning_per_frames']}, window {c['window']}; scores {res['score_distribution']}")
    print(f"{'reference':<38} {'k':>5} {'h':>5} {'unchanged':>10} {'cross.':>6} {'/100k [95%]':>17} {'recal.':>6} "
          f"{'warn/100k':>9} | "
          f"{'delay median':>12} {'p95':>6} {'<=500':>6} {'missed':>6}")
    for r in res["rows"]:
        sp, d = r["spurious"], r["delay"]
        print(f"{r['reference']:<38} {d['k_median']:>5.3f} {sp['limit_median']:>5.1f} {sp['frames']:>10} "
              f"{sp['crossings']:>6} {sp['per_100k']:>5.2f} [{sp['per_100k_ci95'][0]:.2f}, {sp['per_100k_ci95'][1]:.2f}] "
              f"{sp['recalibrate']:>6} {sp['warning_per_100k']:>9.1f} | "
              f"{d['median']:>12.0f} {d['p95']:>6.0f} {d['within_500']:>6.1%} {d['missed']:>6}")
        if "delay_during_baseline" in r:
            b = r["delay_during_baseline"]
            print(f"{'  shift at frame ' + str(b['shift_at']) + ' (in the baseline)':<38} {b['k_median']:>5.3f} "
                  f"{'':>5} {'':>10} {'':>6} {'':>17} {'':>6} {'':>9} | {b['median']:>12.0f} {b['p95']:>6.0f} "
                  f"{b['within_500']:>6.1%} {b['missed']:>6}  pooled by the alarm: {b['pooled_at_alarm']}/{b['trials']}")
    write_results(args.out, "bench_drift-", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
