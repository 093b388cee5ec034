"""What mirror scoring adds: one checkpoint scored as fitted and with `score_hflip` toggled.

    python -m benchmarks.research.probe_hflip --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant [--groups benchmarks/groups/magnetic_tile.csv]

`score_hflip` changes only the scoring (the map is the mean of the image's and its mirror image's, mirrored
back), so the same generator, discriminator and memories are scored both ways. For the mirrored scoring the
map's normalisation is re-set as `fit` sets it (train.fit.calibrate_scores on the maps of the good images the
checkpoint names in `score_stats_images`: both views); without mirroring it is the checkpoint's own. The
split is scored as `train.evaluate` scores it: image, pixel AUROC, AUPRO, per type. Choose on `val`, report
once on `test`; with --groups the split is the grouped protocol's (the checkpoint fit with the same file), and
the image-AUROC difference gets a 95 % interval from resampling whole groups (train.metrics.
group_bootstrap_auroc_difference; a pasted defect counts in its own part's group). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.research.probe_json import write_probe_rows

from engine.errors import DaadError
from train.checkpoint import load_model
from train.cli import checked_groups
from train.data import Sample, load_images
from train.evaluate import compute_metrics, load_split, predict
from train.fit import calibrate_scores, image_maps, preprocess_spec
from train.metrics import group_bootstrap_auroc_difference
from train.transplant import transplant_set

SCALES = ("r_scale", "l_scale", "m_scale", "c_scale")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=("all", "val", "test"))
    parser.add_argument("--transplant", action="store_true")
    parser.add_argument("--groups", default="", help="groups CSV the checkpoint was fit with (grouped protocol)")
    parser.add_argument("--out", default="benchmarks/results/probe_hflip")
    args = parser.parse_args()

    model, state = load_model(args.checkpoint)
    try:
        groups = checked_groups(args.groups, Path(args.data), state, args.checkpoint) if args.groups else None
        named = state.get("training_data", {}).get("score_stats_images", [])
        if not named:
            raise DaadError(f"{args.checkpoint}: names no held-back good images (score_stats_images) to re-set "
                            "the mirrored map's normalisation on; fit it with a data-drawn memory or --holdout")
        held = load_images([Sample(Path(p), 0, "good") for p in named], preprocess_spec(model.cfg))
    except DaadError as err:
        print(f"probe_hflip: error: {err}", file=sys.stderr)
        return 2
    own = model.cfg
    fitted = {name: getattr(model, name).clone() for name in SCALES if hasattr(model, name)}
    cpu = torch.device("cpu")
    samples, images, masks, labels, types = load_split(Path(args.data), preprocess_spec(own), args.split, 0, groups)
    views = {"test/": images}
    if args.transplant:
        views["pasted"] = transplant_set(images, masks, labels)[0]
    t0 = time.perf_counter()
    rows, scores = [], {}
    for hflip in (own.score_hflip, not own.score_hflip):
        model.cfg = dataclasses.replace(own, score_hflip=hflip)
        for name, value in fitted.items():
            getattr(model, name).copy_(value)
        if hflip != own.score_hflip:
            calibrate_scores(model, image_maps(model, torch.from_numpy(held), cpu), cpu)
        for view, view_images in views.items():
            pred = predict(model, view_images, cpu)
            scores[hflip, view] = pred["scores"]
            got = compute_metrics(labels, types, pred["scores"], pred["maps"], masks)
            b = got["pixel_auroc_breakdown"]
            rows.append({"score_hflip": hflip, "fitted": hflip == own.score_hflip, "view": view,
                         "image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"], "aupro": got["aupro"],
                         "pixel_against_good_images": b["against_good_images"],
                         "pixel_against_defective_backgrounds": b["against_defective_backgrounds"],
                         "image_auroc_per_type": got["image_auroc_per_type"], "pixel_auroc_per_type": b["per_type"]})
            print(json.dumps(rows[-1], default=float), flush=True)
    intervals = {}
    if groups is not None:
        part_of = [groups.group(sample) for sample in samples]
        for view in views:
            intervals[view] = group_bootstrap_auroc_difference(labels, scores[False, view], scores[True, view], part_of)

    print(f"\n{args.checkpoint}: split `{args.split}`{' (grouped protocol)' if groups else ''}; fitted with "
          f"score_hflip {own.score_hflip}; {time.perf_counter() - t0:.0f} s")
    type_names = sorted({t for r in rows for t in r["image_auroc_per_type"]})
    header = (f"{'mirror':>6s} {'view':7s} {'image':>6s} {'pixel':>6s} {'AUPRO':>6s} {'vs good':>7s} {'vs bg':>6s}  "
              + " ".join(f"{t:>9s}" for t in type_names))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{'yes' if r['score_hflip'] else 'no':>6s} {r['view']:7s} {r['image_auroc']:6.3f} {r['pixel_auroc']:6.3f} "
              f"{r['aupro']:6.3f} {r['pixel_against_good_images']:7.3f} {r['pixel_against_defective_backgrounds']:6.3f}  "
              + " ".join(f"{r['image_auroc_per_type'].get(t, float('nan')):9.3f}" for t in type_names))
    for view, got in intervals.items():
        print(f"mirror minus not, image AUROC, {view}: {got['difference']:+.3f} (95 % over {got['groups']} groups: "
              f"{got['low']:+.3f} to {got['high']:+.3f})")
    rows.extend({"view": view, "mirror_minus_not_image_auroc": got} for view, got in intervals.items())
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
