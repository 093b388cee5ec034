"""Does calibration keep its promise on data it has not seen?

Takes an MVTec-layout dataset and the bundle trained on its train/good. test/good is split in two
deterministic halves (by sorted name: even positions calibrate, odd positions are held out), so
neither half was used for training. For each target false-alarm rate the thresholds are fitted on
the calibration half exactly as `daad-calibrate fit` does (calibration.fit.fit_thresholds), then:
  - the false-alarm rate measured on the held-out half (count, rate, exact 95% interval), next to
    the interval the fit stated;
  - the share of held-out good frames that would show a region (pixel threshold + min area);
  - the miss rate on every defective image, per defect type.
With --groups (train.groups; the bundle fit with `daad-train fit --groups` on the same file) the good
frames are instead the grouped protocol's held-out good images, parts the model never trained on: the
groups' `val` half calibrates, the `test` half is held out.
Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench_calibration.py --dataset /work/shared/datasets/magnetic_tile --bundle BUNDLE
    python benchmarks/bench_calibration.py --synthetic /tmp/bench_cal   # harness check: template bundle,
                                                                          # synthetic parts (numbers say nothing about DAAD)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from calibration import stats  # noqa: E402
from calibration.capture import Capture, read_image_files, score_frames, software_versions  # noqa: E402
from calibration.fit import GOOD_DIR, DefectSet, fit_thresholds, pct  # noqa: E402
from engine.backend import open_backend  # noqa: E402
from engine.bundle import Bundle, load_bundle  # noqa: E402
from engine.errors import DaadError, DatasetError  # noqa: E402
from engine.preprocess import list_images  # noqa: E402
from engine.regions import count_regions  # noqa: E402

TARGETS = (0.01, 0.005, 0.001)
RESULTS_DIR = REPO / "benchmarks" / "results"
SYNTHETIC_GOOD = 1200  # 600 per half: resolves 1% and 0.5% by counting, 0.1% only by the tail fit
SYNTHETIC_PER_DEFECT = 25
GPD_BOOTSTRAP = 100  # as daad-calibrate fit


def split_good(files: Sequence[Path]) -> Tuple[List[Path], List[Path]]:
    """Even positions of the sorted list calibrate, odd positions are held out: deterministic, and both
    halves span the whole acquisition order if the names follow it."""
    ordered = sorted(files)
    return ordered[0::2], ordered[1::2]


def score_files(files: Sequence[Path], bundle: Bundle, backend: Any) -> Tuple[np.ndarray, np.ndarray, List[str], List[str]]:
    skipped: List[str] = []
    scores, maps, names = [], [], []
    for name, _, scored in score_frames(read_image_files(files, skipped), bundle, backend):
        scores.append(scored.score)
        maps.append(scored.anomaly_map)
        names.append(name)
    h, w = bundle.preprocess.height, bundle.preprocess.width
    return (np.asarray(scores, dtype=np.float64), np.stack(maps) if maps else np.zeros((0, h, w), np.float32),
            names, skipped)


def grouped_good(dataset: Path, groups_file: Path) -> Tuple[List[Path], List[Path]]:
    """(calibrate, held out): the grouped protocol's good images, its val and test halves of whole groups."""
    from train.groups import grouped_protocol, load_groups, split_by_group

    groups = load_groups(groups_file, dataset)
    good = [s for s in grouped_protocol(dataset, groups)[1] if s.label == 0]
    return ([good[i].image for i in split_by_group(good, "val", groups)],
            [good[i].image for i in split_by_group(good, "test", groups)])


def run(dataset: Path, bundle_path: Path, targets: Sequence[float], backend_name: str = "auto",
        strategy: str = "auto", groups_file: Optional[Path] = None) -> Dict[str, Any]:
    bundle = load_bundle(bundle_path)
    test = dataset / "test"
    good_dir = test / GOOD_DIR
    if not good_dir.is_dir():
        raise DatasetError(f"{good_dir}: missing; the benchmark needs an MVTec-layout dataset with test/good")
    calib_files, held_files = (grouped_good(dataset, groups_file) if groups_file is not None
                               else split_good(list_images(good_dir)))
    kinds = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != GOOD_DIR and list_images(d))
    started = time.perf_counter()
    n_scored = 0
    with open_backend(bundle, prefer=backend_name) as backend:
        cal_scores, cal_maps, cal_names, skipped = score_files(calib_files, bundle, backend)
        held_scores, held_maps, _, skipped_held = score_files(held_files, bundle, backend)
        skipped += skipped_held
        defect_scores: Dict[str, np.ndarray] = {}
        defect_files: Dict[str, List[str]] = {}
        defect_maps: Dict[str, np.ndarray] = {}
        for kind in kinds:
            s, m, names, sk = score_files(list_images(test / kind), bundle, backend)
            skipped += sk
            defect_scores[kind], defect_maps[kind], defect_files[kind] = s, m, names
        backend_used = backend.name
    n_scored = cal_scores.size + held_scores.size + sum(v.size for v in defect_scores.values())
    scoring_s = time.perf_counter() - started
    capture = Capture(root=good_dir, meta={"bundle": {"sha256": bundle.sha256, "name": bundle.name},
                                           "bundle_score_stats": dict(bundle.score_stats),
                                           "source": {"kind": "benchmark", "path": str(good_dir), "split": "even"}},
                      scores=cal_scores, maps=cal_maps, frame_files=cal_names, source_names=cal_names)
    defects = DefectSet(root=dataset, scores=defect_scores, files=defect_files, maps=defect_maps,
                        good_scores=held_scores) if defect_scores else None
    rows = []
    for target in targets:
        t0 = time.perf_counter()
        result = fit_thresholds(capture, target, strategy, defects, n_boot=GPD_BOOTSTRAP)
        fit_s = time.perf_counter() - t0
        th = result.thresholds
        flagged = int(np.sum(held_scores > th.image_threshold))
        lo, hi = stats.clopper_pearson(flagged, held_scores.size) if held_scores.size else (0.0, 1.0)
        with_regions = sum(count_regions(m, th.pixel_threshold, th.min_defect_area) > 0 for m in held_maps)
        c = result.at_chosen
        rows.append({
            "target": target,
            "strategy": th.strategy,
            "image_threshold": th.image_threshold,
            "pixel_threshold": th.pixel_threshold,
            "min_defect_area": th.min_defect_area,
            "n_calibration": int(cal_scores.size),
            "stated_expected_rate": c.expected_rate,
            "stated_ci95": list(c.ci),
            "stated_model_ci95": list(c.model_ci) if c.model_ci else None,
            "heldout": {"n": int(held_scores.size), "flagged": flagged,
                        "rate": flagged / held_scores.size if held_scores.size else None, "ci95": [lo, hi],
                        "frames_with_regions": int(with_regions)},
            "miss_rates": result.misses,
            "f1_at_threshold": result.f1_at_chosen.f1 if result.f1_at_chosen else None,
            "best_f1": result.best_f1.f1 if result.best_f1 else None,
            "warnings": list(result.warnings),
            "fit_seconds": fit_s,
        })
    return {
        "benchmark": "calibration",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(dataset.resolve()),
        "bundle": {"name": bundle.name, "sha256": bundle.sha256, "path": str(Path(bundle.root).resolve())},
        "backend": backend_used,
        "split": {"rule": (f"grouped protocol ({groups_file}): held-out groups' good images, val half calibrates, "
                           "test half held out") if groups_file is not None
                  else "sorted test/good: even positions calibrate, odd positions held out",
                  "calibration": len(calib_files), "heldout": len(held_files)},
        "defect_images": {k: int(v.size) for k, v in defect_scores.items()},
        "skipped_images": skipped,
        "scoring": {"images": int(n_scored), "seconds": scoring_s,
                    "images_per_s": n_scored / scoring_s if scoring_s > 0 else None},
        "software": software_versions(),
        "results": rows,
    }


def table(report: Dict[str, Any]) -> str:
    head = (f"{'target':>7} {'strategy':>9} {'threshold':>10} {'stated FA (95%)':>24} {'held-out FA':>20} "
            f"{'regions':>8} {'miss':>7}  per type")
    lines = [f"dataset {report['dataset']}  bundle {report['bundle']['name']} ({report['bundle']['sha256'][:12]}), "
             f"{report['backend']}; calibrate {report['split']['calibration']}, held out {report['split']['heldout']}, "
             f"defects {sum(report['defect_images'].values())}", head, "-" * len(head)]
    for r in report["results"]:
        h = r["heldout"]
        stated = f"{pct(r['stated_expected_rate'])} ({pct(r['stated_ci95'][0])}-{pct(r['stated_ci95'][1])})"
        held = f"{h['flagged']}/{h['n']} = {pct(h['rate'])}" if h["n"] else "n/a"
        miss = r["miss_rates"].get("all", {}).get("miss_rate") if r["miss_rates"] else None
        per_type = ", ".join(f"{k} {pct(v['miss_rate'])}" for k, v in r["miss_rates"].items() if k != "all")
        lines.append(f"{pct(r['target']):>7} {r['strategy']:>9} {r['image_threshold']:>10.5g} {stated:>24} {held:>20} "
                     f"{h['frames_with_regions']:>8} {pct(miss) if miss is not None else 'n/a':>7}  {per_type}")
    warnings = sorted({w for r in report["results"] for w in r["warnings"]})
    if warnings:
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in warnings)
    return "\n".join(lines)


def make_synthetic(root: Path) -> Tuple[Path, Path]:
    """A template bundle and a synthetic MVTec dataset (harness check only)."""
    from tests.bundle_factory import make_template_bundle
    from train.synthetic import write_synthetic_dataset

    dataset, bundle = root / "synthetic", root / "bundle"
    if not (dataset / "test" / GOOD_DIR).is_dir():
        write_synthetic_dataset(dataset, n_train=0, n_test_good=SYNTHETIC_GOOD, n_test_per_defect=SYNTHETIC_PER_DEFECT)
    if not (bundle / "bundle.yaml").is_file():
        make_template_bundle(bundle, size=64)
    return dataset, bundle


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, help="MVTec-layout dataset (test/good, test/<defect>/)")
    parser.add_argument("--bundle", type=Path, help="bundle trained on the dataset's train/good")
    parser.add_argument("--synthetic", type=Path, help="write (or reuse) a synthetic dataset + template bundle here")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="false-alarm rates")
    parser.add_argument("--strategy", choices=("auto", "quantile", "gpd"), default="auto")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto")
    parser.add_argument("--groups", type=Path, help="groups CSV the bundle was fit with: calibrate and measure on "
                        "held-out parts (train.groups)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON result")
    args = parser.parse_args(argv)
    try:
        if args.synthetic is not None:
            dataset, bundle = make_synthetic(args.synthetic)
        elif args.dataset is not None and args.bundle is not None:
            dataset, bundle = args.dataset, args.bundle
        else:
            parser.error("pass --dataset and --bundle, or --synthetic DIR")
        report = run(dataset, bundle, args.targets, args.backend, args.strategy, args.groups)
        report["synthetic"] = args.synthetic is not None
    except DaadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"calibration_{report['bundle']['name']}_{Path(report['dataset']).name}_{stamp}.json"
    path = args.out / name
    path.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
