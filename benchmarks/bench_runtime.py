#!/usr/bin/env python3
"""ONNX Runtime (CPU) against PyTorch eager on the same model and frames, batch 1, at the deployed
input size: latency p50/p99, frames per second, and the ratio ORT/PyTorch (goal <= 0.8).

    python benchmarks/bench_runtime.py --checkpoint runs/x/last.pt --bundle bundle/ [--iterations 200]
    python benchmarks/bench_runtime.py --model daad_plus --size 128      # untrained weights, same cost

The two runtimes are timed in blocks, never interleaved (2 shared cores), and the whole comparison
is repeated --rounds times; the ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.bundle import load_bundle  # noqa: E402
from engine.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from engine.preprocess import preprocess  # noqa: E402
from train.checkpoint import load_model  # noqa: E402
from train.synthetic import make_defective, make_good  # noqa: E402


def time_calls(fn: Callable[[np.ndarray], object], frames: List[np.ndarray], iterations: int) -> np.ndarray:
    for f in frames[:5]:
        fn(f)  # warm-up: allocator, thread pools, lazy init
    out = np.empty(iterations)
    for i in range(iterations):
        x = frames[i % len(frames)]
        t0 = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t0
    return out * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="trained checkpoint (else an untrained preset: same cost)")
    parser.add_argument("--bundle", help="bundle exported from --checkpoint (else exported to a temp dir)")
    parser.add_argument("--model", default="daad_plus")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--backbone", default="")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch and ORT intra-op threads (0 = library default)")
    parser.add_argument("--json", default="benchmarks/results/runtime.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_runtime_"))
    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        checkpoint = Path(args.checkpoint)
    else:
        from train.checkpoint import save_checkpoint
        from train.config import TrainConfig, preset
        from train.model import DAAD

        model = DAAD(preset(args.model, image_size=(args.size, args.size), backbone=args.backbone)).eval()
        checkpoint = save_checkpoint(tmp / "last.pt", model, TrainConfig(), 0, {}, {})
    if args.bundle:
        bundle = load_bundle(args.bundle)
    else:
        from train.export import export_bundle

        bundle = export_bundle(checkpoint, tmp / "bundle")
    spec = bundle.preprocess
    raw = [make_good(0, i, 256) for i in range(8)] + [make_defective(0, i, 256)[0] for i in range(8)]
    frames = [preprocess(r, spec)[None] for r in raw]

    backend = OnnxRuntimeBackend(bundle, batch=1, threads=args.threads)
    model.eval()

    def run_torch(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    rounds: List[Dict[str, float]] = []
    for r in range(args.rounds):
        t_torch = time_calls(run_torch, frames, args.iterations)
        t_ort = time_calls(backend.infer, frames, args.iterations)
        rounds.append({"torch_p50": float(np.median(t_torch)), "torch_p99": float(np.quantile(t_torch, 0.99)),
                       "ort_p50": float(np.median(t_ort)), "ort_p99": float(np.quantile(t_ort, 0.99)),
                       "ratio": float(np.median(t_ort) / np.median(t_torch))})
        print(f"round {r + 1}: torch p50 {rounds[-1]['torch_p50']:.2f} ms, ORT p50 {rounds[-1]['ort_p50']:.2f} ms, "
              f"ratio {rounds[-1]['ratio']:.2f}", flush=True)
    med = {k: float(np.median([x[k] for x in rounds])) for k in rounds[0]}
    name = f"{bundle.name} {spec.height}x{spec.width}"
    print(f"\n{name}, batch 1, {args.iterations} frames x {args.rounds} rounds (medians)")
    print(f"{'runtime':16s} {'p50 ms':>8s} {'p99 ms':>8s} {'fps':>7s}")
    print(f"{'PyTorch eager':16s} {med['torch_p50']:8.2f} {med['torch_p99']:8.2f} {1000 / med['torch_p50']:7.1f}")
    print(f"{'ONNX Runtime CPU':16s} {med['ort_p50']:8.2f} {med['ort_p99']:8.2f} {1000 / med['ort_p50']:7.1f}")
    print(f"ratio ORT/PyTorch (median of rounds): {med['ratio']:.2f}  (goal <= 0.80)")
    size_mb = sum((bundle.root / g.file).stat().st_size for g in bundle.graphs) / 1e6
    print(f"bundle: {size_mb:.1f} MB of ONNX graphs")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": name, "rounds": rounds, "median": med, "bundle_mb": size_mb,
                                           "iterations": args.iterations, "threads": args.threads}, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
