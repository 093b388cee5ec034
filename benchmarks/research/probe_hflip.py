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

import dataclasses
import sys
import time
from pathlib import Path

import torch

from benchmarks.research.probe_protocol import checkpoint_split_or_exit, probe_parser, refuse
from benchmarks.research.probe_report import (METRICS, VIEW, Column, interval_text, print_row, print_table,
                                              scored_row, write_probe_rows)

from train.data import Sample, load_images
from train.evaluate import predict
from train.fit import calibrate_scores, image_maps
from train.metrics import group_bootstrap_auroc_difference
from train.preprocessing import preprocess_spec

SCALES = ("r_scale", "l_scale", "m_scale", "c_scale")


def main() -> int:
    args = probe_parser(__doc__, "benchmarks/results/probe_hflip").parse_args()

    model, state, split = checkpoint_split_or_exit("probe_hflip", args)
    named = state.get("training_data", {}).get("score_stats_images", [])
    if not named:
        refuse("probe_hflip", f"{args.checkpoint}: names no held-back good images (score_stats_images) to re-set "
               "the mirrored map's normalisation on; fit it with a data-drawn memory or --holdout")
    own = model.cfg
    held = load_images([Sample(Path(p), 0, "good") for p in named], preprocess_spec(own))
    fitted = {name: getattr(model, name).clone() for name in SCALES if hasattr(model, name)}
    cpu = torch.device("cpu")
    views = split.views(args.transplant)
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
            rows.append(scored_row(split.labels, split.types, split.masks, pred["scores"], pred["maps"],
                                   score_hflip=hflip, fitted=hflip == own.score_hflip, view=view))
            print_row(rows[-1])
    intervals = {}
    if split.groups is not None:
        for view in views:
            intervals[view] = group_bootstrap_auroc_difference(split.labels, scores[False, view], scores[True, view],
                                                               split.parts())

    print(f"\n{args.checkpoint}: split `{args.split}`{' (grouped protocol)' if split.groups else ''}; fitted with "
          f"score_hflip {own.score_hflip}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [Column("mirror", ">6s", lambda r: "yes" if r["score_hflip"] else "no"), VIEW, *METRICS])
    for view, got in intervals.items():
        print(f"mirror minus not, image AUROC, {view}: {interval_text(got)}")
    rows.extend({"view": view, "mirror_minus_not_image_auroc": got} for view, got in intervals.items())
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
