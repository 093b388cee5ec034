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

import dataclasses
import sys
import time
from pathlib import Path

from benchmarks.research.probe_protocol import load_checkpoint, probe_parser, refuse
from benchmarks.research.probe_report import METRICS, VIEW, col, metric_fields, print_row, print_table, write_probe_rows

from engine.errors import DaadError
from train.cli import checked_groups
from train.evaluate import evaluate


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_coarse")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.15, 0.25, 0.35])
    args = parser.parse_args()

    try:
        model, state = load_checkpoint(args.checkpoint)
        groups = checked_groups(args.groups, Path(args.data), state, args.checkpoint) if args.groups else None
    except DaadError as err:
        refuse("probe_coarse", err)
    if model.coarse_memory is None:
        refuse("probe_coarse", f"{args.checkpoint}: has no coarse memory (fit it with coarse_memory_weight > 0)")
    own = model.cfg
    t0 = time.perf_counter()
    rows = []
    for weight in args.weights:
        model.cfg = dataclasses.replace(own, coarse_memory_weight=weight)
        for transplant in ([False, True] if args.transplant else [False]):
            got = evaluate(model, Path(args.data), plot=False, split=args.split, transplant=transplant,
                           groups=groups)
            rows.append({"coarse_memory_weight": weight, "view": "pasted" if transplant else "test/",
                         **metric_fields(got)})
            print_row(rows[-1])
    model.cfg = own

    print(f"\n{args.checkpoint}: split `{args.split}` (fitted with coarse_memory_weight {own.coarse_memory_weight:g}); "
          f"{time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("coarse_memory_weight", "5.2f", "delta"), VIEW, *METRICS])
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
