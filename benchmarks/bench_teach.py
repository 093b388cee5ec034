"""Staying right on site, measured on real parts: the drift alarm and `daad-calibrate teach` on a grouped dataset.

"The line changed" is a new lamp: magnetic_tile photographs every tile under six exposures (source_map.csv,
`exp<k>` in the source name), and exposure --new-exposure is kept away from training and calibration. The grouped
protocol (train.groups) holds out a quarter of the groups with good images; the product model (preset inspect) is
fit on the protocol's training images at the other exposures only:
  CAL       held-out good images of the other exposures: the image threshold at --false-alarm-rate and the drift
            reference, as `daad-calibrate fit` writes them;
  NEW-EVAL  held-out good images at the new exposure (parts never seen, under the new lamp);
  NEW-TEACH good images of the training groups at the new exposure, with the gain (what a technician would teach:
            the line's parts under the new lamp, as it shows them; never in the model at that exposure).
Then:
  (a) drift alarm (agent.drift, default config): frames resampled from CAL's scores for --unchanged frames ->
      spurious alarms; CAL frames followed by new-exposure frames -> frames until `recalibrate`, over --trials;
  (b) false-alarm rate on NEW-EVAL at the calibrated threshold, before and after teaching K frames of NEW-TEACH
      (K = 5, 20, 50, spread over its groups; `calibration.teach.teach_bundle`, ONNX Runtime only), exact intervals;
  (c) image AUROC (group bootstrap, train.metrics) and the miss rate at the threshold on every defective image
      against CAL + NEW-EVAL good images, before and after; and the teach time of each K (this machine's cores,
      shared with other work).
Prints a table and writes JSON under benchmarks/results/.

    python benchmarks/bench_teach.py --dataset /work/shared/datasets/magnetic_tile \\
        --groups benchmarks/groups/magnetic_tile.csv --new-exposure 6 [--new-gain 1.2] [--no-drift]
Why teaching first seemed not to help, and the design choices: docs/research/teaching.md (benchmarks/research/diag_teach.py).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import DriftConfig  # noqa: E402
from benchmarks.protocol import write_results  # noqa: E402
from agent.drift import DRIFT_RECALIBRATE, DriftMonitor, reference_from_dict  # noqa: E402
from calibration import stats  # noqa: E402
from calibration.teach import teach_bundle  # noqa: E402
from engine.backend import open_backend  # noqa: E402
from engine.bundle import load_bundle  # noqa: E402
from engine.preprocess import preprocess, read_image  # noqa: E402

K_VALUES = (5, 20, 50)
SEED = 0


def exposures(dataset: Path) -> Dict[str, str]:
    """image path relative to the dataset -> its exposure (`exp<k>` of the source name in source_map.csv)."""
    out = {}
    with open(dataset / "source_map.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            m = re.search(r"exp(\d+)", row["source_image"])
            out[row["image"]] = m.group(1) if m else ""
    return out


def training_copy(dataset: Path, training: Sequence[Any], exposure: str, work: Path) -> Path:
    """train/good of the grouped protocol's training images without the new exposure (the fit sees nothing else)."""
    exp = exposures(dataset)
    root = work / "data"
    if not root.is_dir():
        (root / "train" / "good").mkdir(parents=True)
        for s in training:
            rel = Path(s.image).relative_to(dataset).as_posix()
            if exp[rel] != exposure:
                shutil.copy2(s.image, root / "train" / "good" / Path(rel).name)
    return root


def with_gain(path: Path, gain: float, folder: Path) -> Path:
    """A copy of the image with its pixels times `gain` (clipped), as a lamp that ages or is replaced would do."""
    import cv2

    out = folder / f"{Path(path).parent.name}-{Path(path).name}"
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32)
        cv2.imwrite(str(out), np.clip(image * gain, 0, 255).astype(np.uint8))
    return out


def score_files(bundle_dir: Path, files: Sequence[Path]) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    with open_backend(bundle, prefer="onnxruntime") as be:
        return np.array([float(be.infer(preprocess(read_image(f), bundle.preprocess)[None]).score[0]) for f in files])


def rate(scores: np.ndarray, threshold: float) -> Dict[str, Any]:
    k, n = int(np.sum(scores > threshold)), int(scores.size)
    lo, hi = stats.clopper_pearson(k, n)
    return {"flagged": k, "n": n, "rate": k / n if n else None, "ci95": [lo, hi]}


def drift_runs(cal: np.ndarray, new: np.ndarray, threshold: float, unchanged: int, trials: int,
               rng: np.random.Generator) -> Dict[str, Any]:
    cfg = DriftConfig()
    fa_rate = max(float(np.mean(cal > threshold)), 0.5 / cal.size)  # the rate the threshold was set for, as fit states it
    reference = stats.drift_reference(cal, threshold, fa_rate)
    ref = reference_from_dict(reference)
    mon = DriftMonitor(cfg.window, cfg.alarm_per_frames, cfg.warning_per_frames, ref, cfg.detect_false_alarm_ratio)
    alarms = 0
    for s in rng.choice(cal, unchanged).tolist():
        if s <= threshold and mon.add(s) and mon.state == DRIFT_RECALIBRATE:
            alarms += 1
    delays: List[int] = []
    for _ in range(trials):
        mon = DriftMonitor(cfg.window, cfg.alarm_per_frames, cfg.warning_per_frames, ref, cfg.detect_false_alarm_ratio)
        for s in rng.choice(cal, 2 * cfg.window).tolist():
            if s <= threshold:
                mon.add(s)
        delay = -1
        for i, s in enumerate(rng.choice(new, 5000).tolist()):
            if s <= threshold and mon.add(s) and mon.state == DRIFT_RECALIBRATE:
                delay = i + 1
                break
        delays.append(delay)
    found = np.array([d for d in delays if d > 0])
    return {"reference": {k: reference[k] for k in ("n_frames", "false_alarm_rate")}, "unchanged_frames": unchanged,
            "spurious_recalibrate": alarms, "per_100k": alarms * 1e5 / unchanged, "trials": trials,
            "fired_within_5000": int(found.size), "delay_median": float(np.median(found)) if found.size else None,
            "delay_p95": float(np.quantile(found, 0.95)) if found.size else None}


def detection(defect_scores: np.ndarray, good_scores: np.ndarray, defect_groups: List[str],
              good_groups: List[str], threshold: float) -> Dict[str, Any]:
    from train.metrics import group_bootstrap_auroc

    labels = [1] * len(defect_scores) + [0] * len(good_scores)
    auroc = group_bootstrap_auroc(labels, np.concatenate([defect_scores, good_scores]), defect_groups + good_groups,
                                  draws=1000, seed=SEED)
    missed = int(np.sum(defect_scores <= threshold))
    lo, hi = stats.clopper_pearson(missed, len(defect_scores))
    return {"auroc": auroc, "miss_rate": missed / len(defect_scores), "miss_ci95": [lo, hi]}


@dataclass
class Setup:
    """The fit bundle and the image lists of the scenario (see the module's docstring)."""

    bundle: Path
    fit_s: float
    parts: Dict[str, List[Any]]  # CAL, NEW-EVAL, NEW-TEACH: samples
    files: Dict[str, List[Path]]  # the same, as the files scored (NEW-* with the gain applied)
    defects: List[Any]
    groups: Any  # train.groups.Groups


def prepare(args: argparse.Namespace) -> Setup:
    """Fit and export the product model on the protocol's training images without the new exposure (cached in
    --work), and the scenario's image lists."""
    from train.config import TrainConfig, preset
    from train.export import export_bundle
    from train.fit import fit
    from train.groups import grouped_protocol, load_groups
    from train.data import train_samples

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    new_exp = str(args.new_exposure)
    exp = exposures(args.dataset)
    full = load_groups(args.groups, args.dataset)
    training, evaluated = grouped_protocol(args.dataset, full)
    good = [s for s in evaluated if s.label == 0]
    defects = [s for s in evaluated if s.label == 1]
    held = {full.group(s) for s in good}
    # the fit sees the protocol's training images at the other exposures only (the statistics' hold-back is by
    # image there: the training groups are all the copy holds)
    data = training_copy(args.dataset, training, new_exp, work)
    bundle = work / "bundle"
    if not (bundle / "bundle.yaml").is_file():
        result = fit(preset("inspect"), TrainConfig(data=str(data), out=str(work / "run"), seed=SEED), progress=False)
        export_bundle(result.checkpoint, bundle)
    fit_s = time.perf_counter() - t0

    def rel(s: Any) -> str:
        return Path(s.image).relative_to(args.dataset).as_posix()

    parts: Dict[str, List[Any]] = {
        "CAL": [s for s in good if exp[rel(s)] != new_exp],
        "NEW-EVAL": [s for s in good if exp[rel(s)] == new_exp],
        "NEW-TEACH": [s for s in train_samples(args.dataset) if exp[rel(s)] == new_exp and full.group(s) not in held],
    }
    files = {k: [s.image for s in v] for k, v in parts.items()}
    if args.new_gain != 1.0:  # the new lamp is also dimmer or brighter: the new frames' pixels times the gain
        for k in ("NEW-EVAL", "NEW-TEACH"):
            files[k] = [with_gain(f, args.new_gain, work / f"gain{args.new_gain:g}" / k) for f in files[k]]
    return Setup(bundle=bundle, fit_s=fit_s, parts=parts, files=files, defects=defects, groups=full)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    setup = prepare(args)
    work, bundle, parts, files, full = args.work, setup.bundle, setup.parts, setup.files, setup.groups
    defects, new_exp, fit_s = setup.defects, str(args.new_exposure), setup.fit_s
    defect_files = [s.image for s in defects]
    scores = {k: score_files(bundle, v) for k, v in files.items()}
    defect_scores = score_files(bundle, defect_files)
    threshold = stats.quantile_threshold(scores["CAL"], args.false_alarm_rate).threshold
    rng = np.random.default_rng(SEED)
    new_all = np.concatenate([scores["NEW-TEACH"], scores["NEW-EVAL"]])
    out: Dict[str, Any] = {
        "dataset": str(args.dataset), "groups_file": str(args.groups), "new_exposure": new_exp, "new_gain": args.new_gain,
        "false_alarm_rate": args.false_alarm_rate, "fit_and_export_s": fit_s, "threshold": threshold,
        "images": {**{k: len(v) for k, v in files.items()}, "defects": len(defect_files)},
        "groups": {k: len({full.group(s) for s in v}) for k, v in parts.items()},
        "false_alarms_cal": rate(scores["CAL"], threshold), "false_alarms_new": rate(new_all, threshold),
    }
    if not args.no_drift:
        out["drift"] = drift_runs(scores["CAL"], new_all, threshold, args.unchanged, args.trials, rng)
    good_groups = [full.group(s) for s in parts["CAL"] + parts["NEW-EVAL"]]
    defect_groups = [full.group(s) for s in defects]
    rows = [{"K": 0, "false_alarms_new_eval": rate(scores["NEW-EVAL"], threshold),
             "false_alarms_cal": rate(scores["CAL"], threshold),
             **detection(defect_scores, np.concatenate([scores["CAL"], scores["NEW-EVAL"]]), defect_groups,
                         good_groups, threshold)}]
    # taught frames: round-robin over NEW-TEACH's groups, so K frames show as many parts as they can
    # the files as the line shows them now (with the gain): teaching the original files taught the exposure
    # without the lamp's gain, and at gain 1.5 moved NEW-EVAL's false alarms by 31/40 -> 26/40 only
    by_group: Dict[str, List[Path]] = {}
    for s, f in zip(parts["NEW-TEACH"], files["NEW-TEACH"]):
        by_group.setdefault(full.group(s), []).append(f)
    lists = [by_group[g] for g in sorted(by_group)]
    order: List[Path] = []
    for i in range(max(len(v) for v in lists)):
        order.extend(v[i] for v in lists if i < len(v))
    for k in K_VALUES:
        frames = work / f"teach{k}"
        shutil.rmtree(frames, ignore_errors=True)
        frames.mkdir()
        for i, f in enumerate(order[:k]):
            os.symlink(Path(f).resolve(), frames / f"{i:03d}{Path(f).suffix}")
        taught = work / f"bundle-taught{k}"
        shutil.rmtree(taught, ignore_errors=True)
        t = time.perf_counter()
        res = teach_bundle(bundle, frames, taught)
        teach_s = time.perf_counter() - t
        new_eval = score_files(taught, files["NEW-EVAL"])
        own = score_files(taught, order[:k])  # the taught frames themselves
        cal = score_files(taught, files["CAL"])
        d = score_files(taught, defect_files)
        rows.append({"K": k, "teach_s": teach_s, "memories": {c.name: [c.before, c.after] for c in res.changes},
                     "false_alarms_new_eval": rate(new_eval, threshold), "false_alarms_cal": rate(cal, threshold),
                     "false_alarms_taught": rate(own, threshold),
                     **detection(d, np.concatenate([cal, new_eval]), defect_groups, good_groups, threshold)})
    out["rows"] = rows
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("/work/shared/datasets/magnetic_tile"))
    ap.add_argument("--groups", type=Path, default=REPO / "benchmarks" / "groups" / "magnetic_tile.csv")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_teach"), help="fit, bundles, taught frames")
    ap.add_argument("--new-exposure", type=int, default=6, help="the exposure (1-6) that plays the new lamp")
    ap.add_argument("--new-gain", type=float, default=1.0,
                    help="pixels of the new exposure's frames times this (e.g. 0.8: the new lamp is 20%% dimmer)")
    ap.add_argument("--false-alarm-rate", type=float, default=0.05)
    ap.add_argument("--unchanged", type=int, default=200_000)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--no-drift", action="store_true", help="skip the drift alarm's runs (teaching only)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    res = run(args)
    print(f"{res['dataset']}, new exposure {res['new_exposure']} x gain {res['new_gain']:g}: groups {res['groups']}, images {res['images']}; "
          f"threshold {res['threshold']:.5g} for {res['false_alarm_rate']:.0%} on CAL")
    fc, fn = res["false_alarms_cal"], res["false_alarms_new"]
    print(f"false alarms at it: CAL {fc['flagged']}/{fc['n']}, NEW {fn['flagged']}/{fn['n']} "
          f"({fn['rate']:.1%}, 95% {fn['ci95'][0]:.1%}-{fn['ci95'][1]:.1%})")
    d = res.get("drift")
    if d is not None:
        print(f"drift: {d['spurious_recalibrate']} recalibrate in {d['unchanged_frames']} unchanged (CAL) frames; "
          f"CAL -> NEW: fired in {d['fired_within_5000']}/{d['trials']} runs within 5000 frames, median delay "
          f"{d['delay_median']}, p95 {d['delay_p95']}")
    print(f"{'K':>3} {'teach s':>8} {'FA NEW-EVAL [95%]':>26} {'FA CAL':>12} {'AUROC [95%]':>22} {'miss':>7}")
    for r in res["rows"]:
        fa, fc, a = r["false_alarms_new_eval"], r["false_alarms_cal"], r["auroc"]
        print(f"{r['K']:>3} {r.get('teach_s', 0.0):>8.1f} {fa['flagged']:>4}/{fa['n']:<4} {fa['rate']:>6.1%} "
              f"[{fa['ci95'][0]:.1%}, {fa['ci95'][1]:.1%}] {fc['flagged']:>4}/{fc['n']:<4}  "
              f"{a['auroc']:.3f} [{a['low']:.3f}, {a['high']:.3f}] {r['miss_rate']:>6.1%}")
    write_results(args.out, f"bench_teach-{args.dataset.name}-", res, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
