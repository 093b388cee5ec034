"""Groups of images that show one physical part, so that no part straddles training and evaluation.

A dataset can hold several photographs of one part (magnetic_tile has each tile under six exposures, and
its train/good and test/good share tiles): a model that memorised a test image's sibling scores it as
known, and the figures overstate what it does on a new part. A groups file says which images belong
together, as CSV with a header `image,group` (image: its path relative to the dataset root, e.g.
`train/good/000.png`; group: any label). With one, the grouped protocol is:

- a fixed quarter of the groups that hold good images is held out (HELD_OUT_FRACTION, seed GROUPS_SEED);
  their good images, from train/good or test/good, are the good images evaluated; training uses the
  other groups' train/good images only, and test/good images of training groups are not evaluated;
- every defective image is evaluated, and `val`/`test` halves split whole groups (balanced per type), so
  no part is in both halves;
- the good images fit() holds back to set the score statistics are whole groups too.

Everything here is pure apart from reading the file; DatasetError names the file, the field and the fix.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Set, Tuple

import numpy as np

from engine.errors import DatasetError

from .data import GOOD, Sample

HELD_OUT_FRACTION = 0.25  # of the groups with good images: their good images are evaluated, never trained on
GROUPS_SEED = 0  # fixed: the protocol stays the same whatever seed a fit uses
COLUMNS = ("image", "group")


@dataclass(frozen=True)
class Groups:
    path: Path
    root: Path
    of_image: Mapping[str, str]  # path relative to root (POSIX) -> group label
    sha256: str

    def group(self, sample: Sample) -> str:
        key = relative_key(sample.image, self.root)
        try:
            return self.of_image[key]
        except KeyError:
            raise DatasetError(f"{self.path}: no row for image {key!r}; every image of {self.root} needs a "
                               "group (regenerate the file for this dataset)") from None


def relative_key(image: Path, root: Path) -> str:
    try:
        return Path(image).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(image).as_posix()


def load_groups(path: Path, root: Path) -> Groups:
    """Read a groups CSV (header `image,group`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: groups file not found")
    raw = path.read_bytes()
    try:
        rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a UTF-8 CSV ({exc})") from exc
    if not rows or any(c not in rows[0] for c in COLUMNS):
        raise DatasetError(f"{path}: expected a header with columns {', '.join(COLUMNS)} and one row per image")
    of_image: Dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        image, group = (row.get("image") or "").strip(), (row.get("group") or "").strip()
        if not image or not group:
            raise DatasetError(f"{path}: line {line}: `image` and `group` must both be set")
        if of_image.setdefault(image, group) != group:
            raise DatasetError(f"{path}: line {line}: image {image!r} is listed in two groups")
    return Groups(path, Path(root), of_image, hashlib.sha256(raw).hexdigest())


def held_out_groups(groups: Groups, good: Sequence[Sample]) -> Set[str]:
    """The fixed share of good images' groups kept out of training and evaluated."""
    labels = sorted({groups.group(s) for s in good})
    if len(labels) < 2:
        raise DatasetError(f"{groups.path}: the good images form {len(labels)} group(s); the grouped protocol "
                           "needs at least 2 (one to train on, one to evaluate)")
    n = max(1, int(round(HELD_OUT_FRACTION * len(labels))))
    order = np.random.default_rng(GROUPS_SEED).permutation(len(labels))
    return {labels[i] for i in order[:n]}


def grouped_train(train: Sequence[Sample], held: Set[str], groups: Groups) -> List[Sample]:
    kept = [s for s in train if groups.group(s) not in held]
    if not kept:
        raise DatasetError(f"{groups.path}: every train/good image is in a held-out group; nothing to train on")
    return kept


def grouped_eval(train: Sequence[Sample], test: Sequence[Sample], held: Set[str], groups: Groups) -> List[Sample]:
    """Defective images, and the held-out groups' good images from train/good and test/good."""
    good = [s for s in list(train) + [s for s in test if s.defect_type == GOOD] if groups.group(s) in held]
    return good + [s for s in test if s.label == 1]


def split_by_group(samples: Sequence[Sample], part: str, groups: Groups, seed: int = 0) -> List[int]:
    """Indices of the `val` or `test` half: whole groups. Each group goes with its most common type; each
    type's groups, in a seeded order, go to whichever half holds fewer of that type's images so far."""
    if part == "all":
        return list(range(len(samples)))
    members: Dict[str, List[str]] = {}
    for s in samples:
        members.setdefault(groups.group(s), []).append(s.defect_type)
    dominant = {g: max(sorted(set(types)), key=types.count) for g, types in members.items()}
    val: Set[str] = set()
    for k, defect_type in enumerate(sorted(set(dominant.values()))):
        of_type = sorted(g for g, t in dominant.items() if t == defect_type)
        order = np.random.default_rng([GROUPS_SEED, seed, k]).permutation(len(of_type))
        count = {"val": 0, "test": 0}
        for i in order:
            half = "val" if count["val"] <= count["test"] else "test"
            if half == "val":
                val.add(of_type[i])
            count[half] += len(members[of_type[i]])
    return [i for i, s in enumerate(samples) if (groups.group(s) in val) == (part == "val")]


def group_counts(samples: Sequence[Sample], groups: Groups) -> Dict[str, Tuple[int, int]]:
    """Per type: (images, groups) -- for the report."""
    out: Dict[str, Tuple[int, int]] = {}
    for t in sorted({s.defect_type for s in samples}):
        of_type = [s for s in samples if s.defect_type == t]
        out[t] = (len(of_type), len({groups.group(s) for s in of_type}))
    return out


def grouped_protocol(root: Path, groups: Groups) -> Tuple[List[Sample], List[Sample]]:
    """(training images, images to evaluate) of an MVTec-layout dataset under the grouped protocol."""
    from .data import eval_samples, train_samples

    train, test = train_samples(root), eval_samples(root)
    held = held_out_groups(groups, list(train) + [s for s in test if s.defect_type == GOOD])
    return grouped_train(train, held, groups), grouped_eval(train, test, held, groups)


def holdout_by_group(samples: Sequence[Sample], fraction: float, seed: int, groups: Groups) -> Tuple[List[Sample], List[Sample]]:
    """(kept, held back): about `fraction` of the images, as whole groups (data.split_holdout's grouped twin)."""
    if fraction <= 0:
        return list(samples), []
    labels = sorted({groups.group(s) for s in samples})
    order = np.random.default_rng(seed).permutation(len(labels))
    target, held, count = fraction * len(samples), set(), 0
    size = {g: 0 for g in labels}
    for s in samples:
        size[groups.group(s)] += 1
    for i in order:
        if count >= target or len(held) == len(labels) - 1:
            break
        held.add(labels[i])
        count += size[labels[i]]
    return [s for s in samples if groups.group(s) not in held], [s for s in samples if groups.group(s) in held]
