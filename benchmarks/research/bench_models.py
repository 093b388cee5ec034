"""Train and evaluate the paper's columns (AE, AE+Skip, DAAD, DAAD+) and variants under one budget
on a dataset directory; print them beside the paper's figures and write JSON.

    python -m benchmarks.research.bench_models --data ../shared/datasets/magnetic_tile --steps 1000 --size 128

Protocol: every config gets the same number of optimiser steps, batch size, seed and input size.
Metrics are reported on --split (default `test`: a fixed half of test/ per defect type, the other half
`val` being the one used to choose settings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from train.checkpoint import load_model
from train.config import PRESETS, TrainConfig, preset
from train.evaluate import evaluate
from train.fit import fit
from train.groups import load_groups

# Image AUROC from the paper's MVTec AD table (../shared/docs/daad.md): category -> column -> value
PAPER = {
    "carpet": (0.411, 0.385, 0.671, 0.866), "grid": (0.841, 0.879, 0.975, 0.957), "leather": (0.615, 0.570, 0.628, 0.862),
    "tile": (0.696, 0.986, 0.825, 0.882), "wood": (0.961, 0.977, 0.957, 0.982), "bottle": (0.955, 0.713, 0.975, 0.976),
    "cable": (0.688, 0.579, 0.720, 0.844), "capsule": (0.819, 0.747, 0.866, 0.767), "hazelnut": (0.884, 0.828, 0.893, 0.921),
    "metal_nut": (0.565, 0.336, 0.552, 0.758), "pill": (0.882, 0.853, 0.898, 0.900), "screw": (0.956, 1.000, 1.000, 0.987),
    "toothbrush": (0.977, 0.742, 0.989, 0.992), "transistor": (0.776, 0.749, 0.814, 0.876), "zipper": (0.878, 0.696, 0.906, 0.859),
    "mean": (0.794, 0.736, 0.845, 0.895),
}
COLUMN = {"ae": 0, "ae_skip": 1, "daad": 2, "daad_plus": 3}


def split_top_level(text: str) -> List[str]:
    """Split on commas outside brackets: `a=1,blocks=[[2,2,0],[1,1,0]]` -> two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_variant(text: str) -> Dict[str, Any]:
    """`daad_plus` or `daad_plus:backbone=efficientnet_lite0,memory_items=50` -> preset + overrides."""
    name, _, rest = text.partition(":")
    overrides: Dict[str, Any] = {}
    for item in filter(None, split_top_level(rest)):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-.tf" and value not in ("",) else value
        if isinstance(overrides[key], list):
            overrides[key] = tuple(tuple(v) if isinstance(v, list) else v for v in overrides[key])
    return {"preset": name, "overrides": overrides, "label": text}


MAX_NAME = 240  # file systems allow 255 bytes a name; longer override lists are cut and told apart by a hash


def run_dir_name(config: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "", config.replace(":", "_").replace(",", "_").replace("=", "-"))
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 13]}_{hashlib.sha256(config.encode()).hexdigest()[:12]}"


SETTINGS_OF_A_ROW = ("data", "steps", "batch_size", "lr", "size", "seed", "split", "device", "transplant", "groups")


def reusable_row(path: Path, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The row an earlier run wrote for this config, if it ran with the same settings."""
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())
    added_later = {"groups": ""}  # settings rows written before them lack; their value then was this
    same = all(earlier["args"].get(k, added_later.get(k)) == getattr(args, k) for k in SETTINGS_OF_A_ROW)
    return earlier["row"] if same else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--configs", nargs="+", default=["ae", "ae_skip", "daad", "daad_plus"],
                        help=f"presets {sorted(PRESETS)}, optionally with :key=value overrides")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="test", choices=("all", "val", "test"))
    parser.add_argument("--out", default="benchmarks/results/models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--transplant", action="store_true",
                        help="also evaluate on the split's defects pasted onto its good images (same backgrounds)")
    parser.add_argument("--groups", default="", help="groups CSV (train.groups): fit and evaluate on the grouped "
                        "protocol, which never scores a part whose sibling images were trained on")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a config's row from an earlier run with the same settings (its row.json)")
    args = parser.parse_args()

    data = Path(args.data)
    category = data.name.lower()
    out = Path(args.out)
    groups = load_groups(Path(args.groups), data) if args.groups else None
    rows: List[Dict[str, Any]] = []
    for text in args.configs:
        variant = parse_variant(text)
        cfg = preset(variant["preset"], image_size=(args.size, args.size), **variant["overrides"])
        run = out / run_dir_name(text)
        earlier = reusable_row(run / "row.json", args) if args.reuse else None
        if earlier is not None:
            print(f"{text}: reused {run / 'row.json'}", flush=True)
            rows.append(earlier)
            continue
        t0 = time.perf_counter()
        result = fit(cfg, TrainConfig(data=str(data), out=str(run / "run"), steps=args.steps, batch_size=args.batch_size,
                                      lr=args.lr, seed=args.seed, device=args.device, checkpoint_every=args.steps,
                                      groups=args.groups))
        train_s = time.perf_counter() - t0
        model, _ = load_model(result.checkpoint)
        metrics = evaluate(model, data, run / "eval", device=args.device, split=args.split, groups=groups)
        paper = PAPER.get(category, PAPER["mean"])[COLUMN[variant["preset"]]] if variant["preset"] in COLUMN else None
        rows.append({"config": text, "model": cfg.name, "image_auroc": metrics["image_auroc"],
                     "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"],
                     "per_type": metrics["image_auroc_per_type"], "pixel_auroc_breakdown": metrics["pixel_auroc_breakdown"],
                     "train_images_per_s": result.images_per_s,
                     "train_s": train_s, "paper": paper, "paper_source": category if category in PAPER else "mean"})
        if args.transplant:
            pasted = evaluate(model, data, run / "eval_transplant", device=args.device, split=args.split, transplant=True,
                              groups=groups)
            rows[-1]["transplant"] = {k: pasted[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_auroc_per_type",
                                                            "pixel_auroc_breakdown")}
        # each row is also kept beside its run: a long benchmark that is stopped keeps what it measured
        (run / "row.json").write_text(json.dumps({"args": vars(args), "row": rows[-1]}, indent=2, default=float))
        print(json.dumps(rows[-1], default=float), flush=True)

    print(f"\n{category}: {args.steps} steps x batch {args.batch_size} at {args.size}px, seed {args.seed}, "
          f"reported on split `{args.split}`" + (f" of the grouped protocol ({args.groups})" if groups else ""))
    header = f"{'config':44s} {'image AUROC':>11s} {'paper':>6s} {'pixel AUROC':>11s} {'AUPRO':>6s} {'img/s':>6s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        paper = f"{r['paper']:.3f}" if r["paper"] is not None else "-"
        print(f"{r['config']:44s} {r['image_auroc']:11.3f} {paper:>6s} {r['pixel_auroc']:11.3f} {r['aupro']:6.3f} "
              f"{r['train_images_per_s']:6.1f}")
    types = sorted({t for r in rows for t in r["per_type"]})
    print("\nper defect type (image AUROC):")
    print(f"{'config':44s} " + " ".join(f"{t:>9s}" for t in types))
    for r in rows:
        print(f"{r['config']:44s} " + " ".join(f"{r['per_type'].get(t, float('nan')):9.3f}" for t in types))
    print("\nper defect type (pixel AUROC), and the pooled pixel AUROC against good images / defective backgrounds only:")
    for r in [r for r in rows if "pixel_auroc_breakdown" in r]:  # rows reused from before it was measured lack it
        b = r["pixel_auroc_breakdown"]
        print(f"{r['config']:44s} " + " ".join(f"{b['per_type'].get(t, float('nan')):9.3f}" for t in types)
              + f"  {b['against_good_images']:.3f} / {b['against_defective_backgrounds']:.3f}")
    if args.transplant:
        print("\nthe same defects pasted onto the split's good images (image AUROC, pixel AUROC, AUPRO, per type):")
        for r in rows:
            t = r["transplant"]
            print(f"{r['config']:44s} {t['image_auroc']:7.3f} {t['pixel_auroc']:7.3f} {t['aupro']:7.3f} "
                  + " ".join(f"{t['image_auroc_per_type'].get(k, float('nan')):9.3f}" for k in types))
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "results.json"
    result_path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(f"\nJSON: {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
