"""Write magnetic_tile's groups file (train.groups): which images show one tile.

    python -m benchmarks.research.magnetic_tile_groups --data ../shared/datasets/magnetic_tile \
        [--out benchmarks/groups/magnetic_tile.csv] [--gap 300]

The source photographs each tile under six exposures (`exp1_num_824.jpg` ... `exp6_num_1012.jpg`): the
numbers of one tile's images lie within ~200 of each other, and tiles are hundreds to thousands apart
(gaps between consecutive numbers: 85 % under 100, 9 % between 100 and 500). The conversion's split took
every fifth good image for test/good, so each test/good tile has its siblings in train/good. This script
reads the dataset's source_map.csv (image -> source file) and starts a new group wherever consecutive
source numbers, over all types, are more than --gap apart: a group is one tile or a few tiles shot
together, never half a tile. It prints the group sizes and writes the CSV atomically. --check also prints,
per test/ folder, how alike each image is to its closest train/good image (correlation of 24x24
thumbnails, each minus its mean): the siblings show as near 1 for test/good and not for defective tiles.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from engine.bundle import atomic_write_text

NUMBER = re.compile(r"num_(\d+)")
GAP = 300


def tile_groups(rows: List[Dict[str, str]], gap: int = GAP) -> Dict[str, str]:
    """image -> group label, from source_map rows (`image`, `source_image`)."""
    numbered: List[Tuple[int, str]] = []
    for row in rows:
        match = NUMBER.search(row["source_image"])
        if match is None:
            raise SystemExit(f"source_map.csv: {row['source_image']!r} has no `num_<n>` in its name")
        numbered.append((int(match.group(1)), row["image"]))
    numbered.sort()
    out, group, previous = {}, 0, None
    for number, image in numbered:
        if previous is not None and number - previous > gap:
            group += 1
        out[image] = f"tile{group:04d}"
        previous = number
    return out


THUMB = 24


def thumbnail(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SystemExit(f"{path}: not a readable image")
    t = cv2.resize(image.astype(np.float32), (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-6)


def closest_train_similarity(root: Path, images: List[str]) -> Dict[str, List[float]]:
    """Per test/ folder: each image's highest thumbnail correlation with a train/good image."""
    train = np.stack([thumbnail(root / i) for i in images if i.startswith("train/")])
    out: Dict[str, List[float]] = collections.defaultdict(list)
    for image in images:
        if image.startswith("test/"):
            out[image.split("/")[1]].append(float((train @ thumbnail(root / image)).max()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="benchmarks/groups/magnetic_tile.csv")
    parser.add_argument("--gap", type=int, default=GAP)
    parser.add_argument("--check", action="store_true", help="also print how alike test/ images are to train/good")
    args = parser.parse_args()
    source_map = Path(args.data) / "source_map.csv"
    if not source_map.is_file():
        print(f"{source_map}: not found; this script needs magnetic_tile's source map", file=sys.stderr)
        return 1
    with open(source_map, newline="") as fh:
        rows = list(csv.DictReader(fh))
    groups = tile_groups(rows, args.gap)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "group"])
    for image in sorted(groups):
        writer.writerow([image, groups[image]])
    atomic_write_text(Path(args.out), buf.getvalue())
    sizes = collections.Counter(collections.Counter(groups.values()).values())
    good = {g for i, g in groups.items() if "/good/" in i}
    print(f"{len(groups)} images in {len(set(groups.values()))} groups ({len(good)} with good images); "
          f"images per group: " + ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items())))
    print(f"wrote {args.out}")
    if args.check:
        print(f"closest train/good image, correlation of {THUMB}x{THUMB} thumbnails (median, 10th percentile, share > 0.95):")
        for folder, values in sorted(closest_train_similarity(Path(args.data), sorted(groups)).items()):
            v = np.array(values)
            print(f"  test/{folder:9s} {np.median(v):.3f}  {np.percentile(v, 10):.3f}  {np.mean(v > 0.95):4.0%}")
        # the grouped protocol's evaluated good images against the images it trains on
        from train.groups import grouped_protocol, load_groups

        root = Path(args.data)
        train, evaluated = grouped_protocol(root, load_groups(Path(args.out), root))
        bank = np.stack([thumbnail(s.image) for s in train])
        v = np.array([float((bank @ thumbnail(s.image)).max()) for s in evaluated if s.label == 0])
        print(f"  grouped protocol: its {len(v)} good images against its {len(train)} training images: "
              f"{np.median(v):.3f}  {np.percentile(v, 10):.3f}  {np.mean(v > 0.95):4.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
