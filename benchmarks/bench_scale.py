#!/usr/bin/env python3
"""How the default model grows with the training set: fit seconds, memory items, bundle MB and ONNX Runtime p50
ms at batch 1, for N training images (default 100, 500 and 5 000). The images are magnetic_tile's good training
tiles at the model's input size, and beyond their count flipped and shifted copies of them (sizes only: no
accuracy is claimed here). Prints a table, writes JSON to benchmarks/results/bench_scale/.

    python benchmarks/bench_scale.py                       # 100, 500, 5000 on this machine's CPU
    python benchmarks/bench_scale.py --sizes 5000 --device cuda
    torchrun --nproc_per_node 4 benchmarks/bench_scale.py --sizes 5000 --device cuda   # features sharded
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_peer import onnx_p50_ms  # noqa: E402
from benchmarks.protocol import DATASETS  # noqa: E402
from engine.preprocess import list_images  # noqa: E402
from train.checkpoint import read_checkpoint  # noqa: E402
from train.config import TrainConfig, preset  # noqa: E402
from train.export import export_bundle  # noqa: E402
from train.fit import fit  # noqa: E402
from train.runtime import distributed_context  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale"
SIZE = 256


def variants(image: np.ndarray, k: int) -> np.ndarray:
    """The k-th copy of an image: flips, then a shift of a few pixels (reflected border)."""
    flips = [lambda x: x, lambda x: x[:, ::-1], lambda x: x[::-1], lambda x: x[::-1, ::-1]]
    out = flips[k % 4](image)
    shift = (k // 4) % 5 * 3
    if shift:
        out = cv2.copyMakeBorder(out, shift, 0, shift, 0, cv2.BORDER_REFLECT)[:SIZE, :SIZE]
    return np.ascontiguousarray(out)


def write_training_set(root: Path, n: int, sources: List[Path]) -> Path:
    """An MVTec-layout folder of n good images (train/good) at the model's size."""
    good = root / "train" / "good"
    good.mkdir(parents=True)
    base = [cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            for p in sources[:n]]
    for i in range(n):
        cv2.imwrite(str(good / f"{i:05d}.png"), variants(base[i % len(base)], i // len(base)))
    return root


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 500, 5000])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, help="where the image sets are written (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rank = distributed_context()[0]
    sources = list_images(DATASETS["magnetic_tile"].root / "train" / "good")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.work) as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            if rank == 0:
                write_training_set(root, n, sources)
            else:
                while not (root / "train" / "good" / f"{n - 1:05d}.png").exists():  # rank 0 writes the set
                    time.sleep(0.5)
                time.sleep(1.0)
            t0 = time.perf_counter()
            result = fit(preset("inspect", in_channels=1), TrainConfig(data=str(root), out=str(root / "run"),
                                                                        device=args.device), progress=False)
            seconds = time.perf_counter() - t0
            if rank != 0:
                continue
            state = read_checkpoint(result.checkpoint)
            bundle = export_bundle(result.checkpoint, root / "bundle")
            row = {"images": n, "fit_seconds": seconds, "device": args.device, "world": int(os.environ.get("WORLD_SIZE", 1)),
                   **state["memory"], "bundle_mb": sum(f.stat().st_size for f in bundle.root.iterdir()) / 1e6,
                   "onnx_p50_ms": onnx_p50_ms(bundle.onnx_path(1), 1, SIZE)}
            rows.append(row)
            print(f"| {n} | {seconds:.0f} | {row['block_items']} of {row['block_offered']} | {row['coarse_items']} of "
                  f"{row['coarse_offered']} | {row['bundle_mb']:.1f} | {row['onnx_p50_ms']:.0f} |", flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench_scale_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        path.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2, default=float))
        print("| images | fit s | block items | coarse items | bundle MB | ORT p50 ms |")
        print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
