#!/usr/bin/env python3
"""The end-to-end demo: train -> evaluate -> export (more steps join as the agent lands).

    python scripts/demo.py [--data MVTEC_CATEGORY_DIR] [--out demo-output] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.errors import DaadError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MVTec-layout dataset (default: generate synthetic parts)")
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a few steps only (used by the test suite)")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        from train.cli import main as train_main
        from train.synthetic import write_synthetic_dataset

        data = Path(args.data) if args.data else out / "dataset"
        if not args.data:
            print(f"[1/3] generating synthetic parts in {data}")
            write_synthetic_dataset(data, n_train=60, n_test_good=20, n_test_per_defect=5, size=128)
        steps = 20 if args.quick else args.steps
        size = "64" if args.quick else "128"
        print(f"[2/3] training DAAD+ for {steps} steps")
        rc = train_main(["fit", "--data", str(data), "--model", "daad_plus", "--size", size, "--steps", str(steps),
                         "--out", str(out / "run")])
        rc = rc or train_main(["eval", "--checkpoint", str(out / "run" / "last.pt"), "--data", str(data),
                               "--out", str(out / "eval")])
        print("[3/3] exporting the bundle")
        rc = rc or train_main(["export", "--checkpoint", str(out / "run" / "last.pt"), "--out", str(out / "bundle"),
                               "--metrics", str(out / "eval" / "metrics.json"),
                               "--parity-images", str(data / "test" / "good")])
        return rc
    except DaadError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
