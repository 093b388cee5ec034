#!/usr/bin/env python3
"""The product beside its peer, per dataset, in one run: `inspect` (DAAD's block-wise memory on frozen
EfficientNet-Lite0 features, `daad-train fit`'s default) and PatchCore on the same features (all patches, and a
10 % coreset). Per model: image AUROC with a 95 % interval, pixel AUROC, AUPRO, fit seconds, bundle MB and ONNX
Runtime p50 ms at batch 1 (CPU). Prints a table, writes JSON to benchmarks/results/.

    python benchmarks/bench_peer.py                                   # both datasets, test halves
    python benchmarks/bench_peer.py --datasets ball_screw --split val --peer-budgets 0.1

Protocol: benchmarks/protocol.py (magnetic_tile grouped, ball_screw its own split; settings chosen on `val`).
Timings share the machine with whatever else runs: compare models within one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.peers import fit_patchcore, peer_config  # noqa: E402
from benchmarks.protocol import DATASETS, Dataset, interval_units  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.config import TrainConfig, preset  # noqa: E402
from train.data import has_colour, train_samples  # noqa: E402
from train.evaluate import compute_metrics, load_split, predict  # noqa: E402
from train.export import export_bundle, export_onnx  # noqa: E402
from train.fit import fit  # noqa: E402
from train.fit_common import fit_samples  # noqa: E402
from train.groups import load_groups  # noqa: E402
from train.metrics import group_bootstrap_auroc  # noqa: E402
from train.preprocessing import preprocess_spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_peer"
WARMUP, RUNS = 3, 20


def onnx_p50_ms(path: Path, channels: int, size: int, runs: int = RUNS) -> float:
    """Median wall time of one batch-1 frame on ONNX Runtime's CPU provider (the engine's session options)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    frame = np.random.default_rng(0).uniform(-1, 1, (1, channels, size, size)).astype(np.float32)
    for _ in range(WARMUP):
        session.run(None, {name: frame})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: frame})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def detection(model: Any, ds: Dataset, split: str) -> Dict[str, Any]:
    """Metrics of one model on one split, with the protocol's image-AUROC interval."""
    groups = load_groups(ds.groups, ds.root) if ds.groups else None
    samples, images, masks, labels, types = load_split(ds.root, preprocess_spec(model.cfg), split, 0, groups)
    pred = predict(model, images, torch.device("cpu"))
    metrics = compute_metrics(labels, types, pred["scores"], pred["maps"], masks)
    interval = group_bootstrap_auroc(labels, pred["scores"], interval_units(samples, groups))
    return {"image_auroc": metrics["image_auroc"], "image_low": interval["low"], "image_high": interval["high"],
            "interval_units": interval["groups"], "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"],
            "image_auroc_per_type": metrics["image_auroc_per_type"], "n_good": metrics["n_good"],
            "n_defective": metrics["n_defective"]}


def run_product(ds: Dataset, channels: int, split: str, work: Path, seed: int) -> Dict[str, Any]:
    cfg = preset("inspect", in_channels=channels)
    train_cfg = TrainConfig(data=str(ds.root), out=str(work / "inspect"), groups=str(ds.groups or ""), seed=seed)
    t0 = time.perf_counter()
    result = fit(cfg, train_cfg, progress=False)
    fit_seconds = time.perf_counter() - t0
    model, state = load_model(result.checkpoint)
    row = {"model": "inspect (DAAD-memory)", "fit_seconds": fit_seconds, **detection(model, ds, split),
           "memory": state.get("memory", {})}
    bundle = export_bundle(result.checkpoint, work / "inspect" / "bundle")
    row["bundle_mb"] = sum(f.stat().st_size for f in bundle.root.iterdir()) / 1e6
    row["onnx_p50_ms"] = onnx_p50_ms(bundle.onnx_path(1), channels, cfg.image_size[0])
    return row


def run_peer(ds: Dataset, channels: int, split: str, work: Path, budget: float, seed: int) -> Dict[str, Any]:
    cfg = peer_config(channels)
    train_cfg = TrainConfig(data=str(ds.root), groups=str(ds.groups or ""), seed=seed)
    samples, _, unseen, _ = fit_samples(cfg, train_cfg, 0)
    model, info = fit_patchcore(cfg, samples + unseen, preprocess_spec(cfg), budget, seed)  # every good training image
    row = {"model": f"PatchCore {budget:.0%}", "fit_seconds": info["fit_seconds"], **detection(model, ds, split),
           "memory": {"items": info["items"], "offered": info["offered"]}}
    path = export_onnx(model, work / f"patchcore_{budget:g}.onnx")
    row["bundle_mb"] = path.stat().st_size / 1e6
    row["onnx_p50_ms"] = onnx_p50_ms(path, channels, cfg.image_size[0], runs=RUNS if budget < 1 else 5)
    return row


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("dataset", "model", "image AUROC (95 %)", "pixel", "AUPRO", "fit s", "bundle MB", "ORT p50 ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['image_auroc']:.3f} ({r['image_low']:.3f}-{r['image_high']:.3f}) "
                     f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['fit_seconds']:.0f} | {r['bundle_mb']:.1f} "
                     f"| {r['onnx_p50_ms']:.0f} |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=sorted(DATASETS), choices=sorted(DATASETS))
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--peer-budgets", nargs="*", type=float, default=[1.0, 0.1],
                        help="PatchCore coreset fractions (1 = every patch)")
    parser.add_argument("--no-product", action="store_true", help="the peers only (e.g. a slow budget on its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        for name in args.datasets:
            ds = DATASETS[name]
            channels = 3 if has_colour(train_samples(ds.root)) else 1
            work = Path(tmp) / name
            work.mkdir(parents=True)
            runs = [] if args.no_product else [lambda: run_product(ds, channels, args.split, work, args.seed)]
            runs += [lambda b=b: run_peer(ds, channels, args.split, work, b, args.seed) for b in args.peer_budgets]
            for run in runs:
                row = {"dataset": name, "split": args.split, **run()}
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_peer_{args.split}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2, default=float))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
