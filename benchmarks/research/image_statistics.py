"""Can plain image statistics tell a dataset's defective crops from its good ones? (a check for capture bias)

    python -m benchmarks.research.image_statistics --data ../shared/datasets/magnetic_tile

Image AUROC, on each fixed half of test/ (train.data.split_eval), of three scores computed on the raw
crops without any model: mean grey level (exposure), its standard deviation (contrast) and the mean
absolute horizontal gradient (texture energy). Figures near 0.5 mean no such shortcut; a model whose
whole-map score separates the folders is then responding to something subtler than exposure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from engine.preprocess import read_image
from train.data import eval_samples, split_eval
from train.metrics import image_auroc

STATISTICS: Dict[str, Callable[[np.ndarray], float]] = {
    "brightness": lambda im: float(im.mean()),
    "contrast": lambda im: float(im.std()),
    "gradient": lambda im: float(np.abs(np.diff(im, axis=1)).mean()),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="benchmarks/results/image_statistics.json")
    args = parser.parse_args()
    samples = eval_samples(Path(args.data))
    result: Dict[str, Dict[str, Dict[str, float]]] = {}
    for part in ("val", "test"):
        chosen = [samples[i] for i in split_eval(samples, part)]
        images = [read_image(s.image).astype(np.float32) for s in chosen]
        labels = np.array([s.label for s in chosen])
        types = np.array([s.defect_type for s in chosen])
        result[part] = {}
        for name, stat in STATISTICS.items():
            values = np.array([stat(im) for im in images])
            row = {"all": image_auroc(labels, values)}
            for t in sorted(set(types.tolist()) - {"good"}):
                sel = np.isin(types, ["good", t])
                row[t] = image_auroc(labels[sel], values[sel])
            result[part][name] = row
    kinds = list(next(iter(result["val"].values())))
    print(f"{'split':5s} {'statistic':10s} " + " ".join(f"{k:>9s}" for k in kinds))
    for part, rows in result.items():
        for name, row in rows.items():
            print(f"{part:5s} {name:10s} " + " ".join(f"{row[k]:9.3f}" for k in kinds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": args.data, "image_auroc": result}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
