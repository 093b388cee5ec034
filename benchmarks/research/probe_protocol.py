"""What a probe reads: its arguments, the checkpoint, the split it scores (as it is and with its defects pasted
onto its good images) and, for a probe that rebuilds a checkpoint's memories, the images `fit` trained on and
the good images it held back for the terms' normalisation. A refusal is one line naming the fix, exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

import numpy as np
import torch

from engine.errors import DaadError
from train.checkpoint import load_model, score_stats_images
from train.cli import checked_groups
from train.data import Sample, load_images, train_samples
from train.evaluate import load_split
from train.groups import Groups, grouped_protocol
from train.preprocessing import preprocess_spec
from train.transplant import transplant_set


SPLITS = ("all", "val", "test")
TRAIN_STRIDE = 4  # every 4th training image stands in for the held-back good ones where fit() held none back


def probe_parser(doc: str, out: str, checkpoint: str = "--checkpoint", groups: bool = True) -> argparse.ArgumentParser:
    """The arguments the probes share: `checkpoint` (`--checkpoints` for several, "" for none), --data, --split,
    --transplant, --groups (unless `groups` is False) and --out (default `out`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if checkpoint == "--checkpoints":
        parser.add_argument(checkpoint, nargs="+", required=True, help="the first is the reference")
    elif checkpoint:
        parser.add_argument(checkpoint, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--transplant", action="store_true",
                        help="also score the split's defects pasted onto its good images (train.transplant)")
    if groups:
        parser.add_argument("--groups", default="",
                            help="groups CSV: the grouped protocol (train.groups); a checkpoint's own, the one it "
                                 "was fit with")
    parser.add_argument("--out", default=out)
    return parser


def refuse(prog: str, err: Any) -> NoReturn:
    """One error line and exit 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    raise SystemExit(2)


def load_checkpoint(path: str) -> Tuple[Any, Dict[str, Any]]:
    """(model, state) of a checkpoint; DaadError naming the fix when there is none."""
    if not Path(path).is_file():
        raise DaadError(f"{path}: no such checkpoint; pass the last.pt of a `daad-train fit` run")
    return load_model(path)


def split_views(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, transplant: bool) -> Dict[str, np.ndarray]:
    """The split's images as they are ("test/") and, with `transplant`, with its defects pasted onto its good
    images ("pasted")."""
    out = {"test/": images}
    if transplant:
        out["pasted"] = transplant_set(images, masks, labels)[0]
    return out


def parts_of(groups: Optional[Groups], samples: List[Sample]) -> List[str]:
    """Each scored image's group (empty without groups): what the group bootstrap resamples."""
    return [groups.group(s) for s in samples] if groups is not None else []


@dataclasses.dataclass(frozen=True)
class Split:
    groups: Optional[Groups]
    samples: List[Sample]  # the split's images, as load_split returns them
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    types: List[str]

    def parts(self) -> List[str]:
        """Each scored image's group (empty without groups): what the group bootstrap resamples."""
        return parts_of(self.groups, self.samples)

    def views(self, transplant: bool) -> Dict[str, np.ndarray]:
        """The images as they are ("test/") and, with `transplant`, with the defects pasted onto good images."""
        return split_views(self.images, self.masks, self.labels, transplant)

    def tensor_views(self, transplant: bool) -> Dict[str, torch.Tensor]:
        return {view: torch.from_numpy(x) for view, x in self.views(transplant).items()}


def checked_split(checkpoint: str, state: Dict[str, Any], data: Path, groups_path: str, spec: Any,
                  split: str) -> Split:
    """The split a checkpoint is scored on (the grouped protocol's with a groups file, which must be the one it
    was fit with: DaadError naming the fix otherwise)."""
    groups = checked_groups(groups_path, data, state, checkpoint) if groups_path else None
    return Split(groups, *load_split(data, spec, split, 0, groups))


def checkpoint_split_or_exit(prog: str, args: argparse.Namespace) -> Tuple[Any, Dict[str, Any], Split]:
    """(model, state, split) for a probe's --checkpoint, --data, --groups and --split, the split preprocessed as
    the model's input; one error line and exit 2 when refused."""
    try:
        model, state = load_checkpoint(args.checkpoint)
        split = checked_split(args.checkpoint, state, Path(args.data), args.groups, preprocess_spec(model.cfg),
                              args.split)
    except DaadError as err:
        refuse(prog, err)
    return model, state, split


def held_back_good(state: Dict[str, Any], data: Path) -> List[Sample]:
    """The good images fit held back from the memory (`score_stats_images`): what normalises a probe's maps on
    unseen parts. Where it held none back, every TRAIN_STRIDE-th training image."""
    unseen = {p.resolve() for p in score_stats_images(state)}
    every = train_samples(data)
    return [s for s in every if s.image.resolve() in unseen] or every[::TRAIN_STRIDE]


@dataclasses.dataclass(frozen=True)
class ProbeData(Split):
    train: List[Sample]  # fit's training images (the grouped protocol's with groups), less the held-back ones
    stats: List[Sample]  # the held-back good images the checkpoint records

    def summary(self, checkpoint: str, split: str) -> str:
        """What was scored, for the line above a probe's table."""
        return (f"{checkpoint}: split `{split}`{' (grouped protocol)' if self.groups else ''}; {len(self.train)} "
                f"training images, {len(self.stats)} held back")

    def training_tensors(self, spec: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The preprocessed training and held-back images."""
        return torch.from_numpy(load_images(self.train, spec)), torch.from_numpy(load_images(self.stats, spec))


def checkpoint_data(checkpoint: str, state: Dict[str, Any], data: Path, groups_path: str, spec: Any,
                    split: str) -> ProbeData:
    """The checkpoint's training, held-back and scored images; DaadError naming the fix when the data or
    groups file is not the one it was fit with."""
    groups = checked_groups(groups_path, data, state, checkpoint) if groups_path else None
    every = grouped_protocol(data, groups)[0] if groups is not None else train_samples(data)
    held = {p.resolve() for p in score_stats_images(state)}
    train = [s for s in every if s.image.resolve() not in held]
    stats = [s for s in every if s.image.resolve() in held]
    recorded = int((state.get("training_data") or {}).get("n_images", len(train)))
    if recorded != len(train) or not stats:
        raise DaadError(f"{checkpoint}: fit trained on {recorded} images and this finds {len(train)} (with "
                        f"{len(stats)} held back); pass the --data and --groups it was fit with")
    return ProbeData(groups, *load_split(data, spec, split, 0, groups), train=train, stats=stats)


def memory_probe_or_exit(prog: str, args: argparse.Namespace, needs: Callable[[Any], bool], what: str,
                         check: Callable[[Any], None] = lambda model: None) -> Tuple[Any, Any, ProbeData]:
    """(model in eval mode, its preprocessing, checkpoint_data) for a probe that rebuilds the memories of
    --checkpoint, which `needs(model)` must accept (else a refusal: "needs `what`"); `check(model)` checks the
    arguments against the model before the images are read."""
    try:
        model, state = load_checkpoint(args.checkpoint)
    except DaadError as err:
        refuse(prog, err)
    if not needs(model):
        refuse(prog, f"{args.checkpoint}: needs {what}")
    check(model)
    spec = preprocess_spec(model.cfg)
    return model.eval(), spec, checkpoint_data_or_exit(prog, args, state, spec)


def checkpoint_data_or_exit(prog: str, args: argparse.Namespace, state: Dict[str, Any], spec: Any) -> ProbeData:
    """checkpoint_data for a probe's --checkpoint, --data, --groups and --split; one error line and exit 2 when refused."""
    try:
        return checkpoint_data(args.checkpoint, state, Path(args.data), args.groups, spec, args.split)
    except DaadError as err:
        refuse(prog, err)
