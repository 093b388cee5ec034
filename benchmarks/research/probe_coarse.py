"""What a checkpoint's coarse memory adds: the same trained model scored with and without its C term.

    python -m benchmarks.research.probe_coarse --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --weights 0 0.15 0.25 0.35 --transplant [--groups benchmarks/groups/magnetic_tile.csv]

Each weight delta replaces `coarse_memory_weight` (A = (1-delta) A' + delta C; 0 = the map without the coarse
memory, the same generator, discriminator and fine memory) and the split is scored by `train.evaluate`:
image AUROC, pixel AUROC, AUPRO, and the pixel AUROC against good images / defective backgrounds. The
checkpoint must have a coarse memory (`coarse_memory_weight` > 0 when fitted). Choose on `val`, report once
on `test`. With --groups (train.groups) the split is the grouped protocol's, and the checkpoint must have
been fit with the same groups file. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks.research.probe_json import write_probe_rows

from engine.errors import DaadError
from train.checkpoint import load_model
from train.cli import checked_groups
from train.evaluate import evaluate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.15, 0.25, 0.35])
    parser.add_argument("--transplant", action="store_true")
    parser.add_argument("--groups", default="", help="groups CSV the checkpoint was fit with (grouped protocol)")
    parser.add_argument("--out", default="benchmarks/results/probe_coarse")
    args = parser.parse_args()

    model, state = load_model(args.checkpoint)
    try:
        groups = checked_groups(args.groups, Path(args.data), state, args.checkpoint) if args.groups else None
    except DaadError as err:
        print(f"probe_coarse: error: {err}", file=sys.stderr)
        return 2
    if model.coarse_memory is None:
        print(f"{args.checkpoint}: has no coarse memory (fit it with coarse_memory_weight > 0)", file=sys.stderr)
        return 2
    own = model.cfg
    t0 = time.perf_counter()
    rows = []
    for weight in args.weights:
        model.cfg = dataclasses.replace(own, coarse_memory_weight=weight)
        for transplant in ([False, True] if args.transplant else [False]):
            got = evaluate(model, Path(args.data), plot=False, split=args.split, transplant=transplant,
                           groups=groups)
            b = got["pixel_auroc_breakdown"]
            rows.append({"coarse_memory_weight": weight, "view": "pasted" if transplant else "test/",
                         "image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"], "aupro": got["aupro"],
                         "pixel_against_good_images": b["against_good_images"],
                         "pixel_against_defective_backgrounds": b["against_defective_backgrounds"],
                         "image_auroc_per_type": got["image_auroc_per_type"], "pixel_auroc_per_type": b["per_type"]})
            print(json.dumps(rows[-1], default=float), flush=True)
    model.cfg = own

    print(f"\n{args.checkpoint}: split `{args.split}` (fitted with coarse_memory_weight {own.coarse_memory_weight:g}); "
          f"{time.perf_counter() - t0:.0f} s")
    types = sorted({t for r in rows for t in r["image_auroc_per_type"]})
    header = (f"{'delta':>5s} {'view':7s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s} {'vs good':>7s} {'vs bg':>6s}  "
              + " ".join(f"{t:>9s}" for t in types))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['coarse_memory_weight']:5.2f} {r['view']:7s} {r['image_auroc']:6.3f} {r['pixel_auroc']:6.3f} "
              f"{r['aupro']:6.3f} {r['pixel_against_good_images']:7.3f} {r['pixel_against_defective_backgrounds']:6.3f}  "
              + " ".join(f"{r['image_auroc_per_type'].get(t, float('nan')):9.3f}" for t in types))
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
