"""What a probe that rebuilds a checkpoint's memories reads: the images `fit` trained on, the good images it
held back for the terms' normalisation, and the split to score."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from engine.errors import DaadError
from train.checkpoint import score_stats_images
from train.cli import checked_groups
from train.data import Sample, load_images, train_samples
from train.evaluate import load_split
from train.groups import Groups, grouped_protocol
from train.transplant import transplant_set


class ProbeData(NamedTuple):
    groups: Optional[Groups]
    train: List[Sample]  # fit's training images (the grouped protocol's with groups), less the held-back ones
    stats: List[Sample]  # the held-back good images the checkpoint records
    samples: List[Sample]  # the split's images, as load_split returns them
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    types: List[str]

    def parts(self) -> List[str]:
        """Each scored image's group (empty without groups): what the group bootstrap resamples."""
        return [self.groups.group(s) for s in self.samples] if self.groups is not None else []

    def training_tensors(self, spec: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The preprocessed training and held-back images."""
        return torch.from_numpy(load_images(self.train, spec)), torch.from_numpy(load_images(self.stats, spec))

    def views(self, transplant: bool) -> Dict[str, torch.Tensor]:
        """The split's images as they are ("test/") and, with `transplant`, with its defects pasted onto good
        images ("pasted")."""
        out = {"test/": torch.from_numpy(self.images)}
        if transplant:
            out["pasted"] = torch.from_numpy(transplant_set(self.images, self.masks, self.labels)[0])
        return out


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
    return ProbeData(groups, train, stats, *load_split(data, spec, split, 0, groups))


def checkpoint_data_or_exit(prog: str, args: argparse.Namespace, state: Dict[str, Any], spec: Any) -> ProbeData:
    """checkpoint_data for a probe's --checkpoint, --data, --groups and --split; one error line and exit 2 when refused."""
    try:
        return checkpoint_data(args.checkpoint, state, Path(args.data), args.groups, spec, args.split)
    except DaadError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
