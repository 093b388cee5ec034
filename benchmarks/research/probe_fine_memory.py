"""What `inspect`'s fine memory should hold: more of each training image, or several block sizes at once.

    python -m benchmarks.research.probe_fine_memory --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --transplant --groups benchmarks/groups/magnetic_tile.csv \
        --rows 4 4:shift 4:flip 4:shift+flip 2+4 4+8 2+4+8 8

Each row rebuilds the fine memory from the checkpoint's own training images (their standardised backbone
features, untrained, every block once) and scores the checkpoint's map with it:
A = (1 - delta) [(1 - beta) L + beta M] + delta C, the checkpoint's beta and delta. A row names its block
sizes on the 32x32 feature map (`2+4+8`: M is the mean of three memories' rebuild errors, each divided by
its mean on the held-back good images; L is the discriminator-feature distance to the read-out of the
checkpoint's own block size) and, after a colon, what else the memories hold:

- `shift`: blocks of the same images on grids offset by half a block (down, right, both): a defect that
  straddles the grid no longer meets only misaligned items, nor does a normal region;
- `flip`: blocks of the images flipped left-right, up-down and both (the training augmentation's flips);
- `l2`: read out the item nearest in Euclidean distance (the least rebuild error) instead of by cosine;
- `k<N>`: M is the mean rebuild error over the N nearest items (PatchCore's k-nearest-neighbour average),
  L still against the nearest;
- `centre`: every image's features less their mean over the image, in the memory and in the queries (the
  read-out is the item plus the query image's mean): a whole tile's shift in appearance is no longer an error.

The first row is the checkpoint's own, trained memory (`trained`). The training images are the ones
`fit` used: train/good (the grouped protocol's training groups with --groups) less the held-back good
images recorded in the checkpoint, which also set every term's normalisation here. Choose on `val`,
report once on `test`. Prints a table and writes JSON.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from benchmarks.research.probe_protocol import memory_probe_or_exit, probe_parser
from benchmarks.research.probe_report import METRICS, VIEW, Column, col, map_row, print_row, print_table, write_probe_rows

from train.data import load_images
from train.fit import backbone_features, statistics_targets
from train.metrics import group_bootstrap_auroc_difference
from train.model import DAAD, assemble, divide, l2_normalize

BATCH = 16
QUERY_CHUNK = 1024
AUGMENTATIONS = ("shift", "flip")
CENTRE = "centre"
FLIPS = ((-1,), (-2,), (-1, -2))


class RowSpec(NamedTuple):
    blocks: Tuple[int, ...]
    augment: Tuple[str, ...]
    metric: str  # "cosine" or "l2"
    k: int
    centre: bool = False


def parse_row(text: str) -> RowSpec:
    """`2+4:shift+flip` -> blocks (2, 4), augmentations ("shift", "flip"); `4:l2+k3` -> Euclidean, 3 nearest."""
    sizes, _, extra = text.partition(":")
    try:
        blocks = tuple(int(s) for s in sizes.split("+"))
    except ValueError:
        raise SystemExit(f"--rows: {text!r}: block sizes must be integers joined by '+', e.g. 2+4:shift") from None
    options = [a for a in extra.split("+") if a]
    ks = [int(a[1:]) for a in options if re.fullmatch(r"k[1-9][0-9]*", a)]
    augment = tuple(a for a in options if a in AUGMENTATIONS)
    unknown = set(options) - set(AUGMENTATIONS) - {"l2", CENTRE} - {f"k{k}" for k in ks}
    if unknown or any(b < 1 for b in blocks) or len(ks) > 1:
        raise SystemExit(f"--rows: {text!r}: sizes >= 1, options among {AUGMENTATIONS}, l2, {CENTRE} and one k<N>")
    return RowSpec(blocks, augment, "l2" if "l2" in options else "cosine", ks[0] if ks else 1, CENTRE in options)


def image_means(x: torch.Tensor) -> torch.Tensor:
    """Each (B, C, h, w) feature map's mean vector over its positions, (B, C, 1, 1)."""
    return x.mean(dim=(2, 3), keepdim=True)


def memory_items(bank: torch.Tensor, block: int, augment: Sequence[str]) -> torch.Tensor:
    """Every block x block block of the (B, C, h, w) bank once, plus the augmentations' blocks."""
    c, h, w = bank.shape[1:]
    maps = [bank] + ([bank.flip(dims) for dims in FLIPS] if "flip" in augment else [])
    parts = []
    for fmap in maps:
        parts.append(divide(fmap.contiguous(), block, block, c))
        if "shift" in augment:
            half = block // 2
            for dy, dx in ((half, 0), (0, half), (half, half)):
                rows, cols = (h - dy) // block * block, (w - dx) // block * block
                parts.append(divide(fmap[:, :, dy:dy + rows, dx:dx + cols].contiguous(), block, block, c))
    return torch.cat(parts)


class Memory:
    """Hard read-out over a fixed set of items: by cosine, as BlockMemory does, or by Euclidean distance;
    the k nearest items, nearest first."""

    def __init__(self, items: torch.Tensor, block: int, metric: str = "cosine", k: int = 1, centre: bool = False) -> None:
        self.items, self.block, self.metric, self.k, self.centre = items, block, metric, k, centre
        self.norms = torch.linalg.vector_norm(items, dim=1).clamp(min=1e-8)
        self.half_sq_norms = 0.5 * (items * items).sum(dim=1)

    def similarity(self, q: torch.Tensor) -> torch.Tensor:
        if self.metric == "l2":  # argmax of q.m - |m|^2 / 2 is argmin of |q - m|^2
            return q @ self.items.t() - self.half_sq_norms
        return (l2_normalize(q) @ self.items.t()) / self.norms

    @torch.no_grad()
    def readouts(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The k nearest items assembled into maps of x's shape (with `centre`, searched for x less its image
        mean, which is added back: the items hold centred blocks)."""
        offset = image_means(x) if self.centre else torch.zeros(())
        queries = divide((x - offset).contiguous(), self.block, self.block, x.shape[1])
        index = torch.cat([self.similarity(q).topk(self.k, dim=1).indices for q in queries.split(QUERY_CHUNK)])
        return [offset + assemble(self.items[index[:, j]], tuple(x.shape), self.block, self.block, x.shape[1])  # type: ignore[arg-type]
                for j in range(self.k)]


@torch.no_grad()
def terms(model: DAAD, targets: torch.Tensor, coarse: torch.Tensor, memories: Optional[Dict[int, Memory]]) -> Dict[str, torch.Tensor]:
    """Per image: M of every memory (`M<block>`), L against the read-out of the model's block size, and C.
    memories None: the checkpoint's own maps (its trained memory)."""
    own = model.generator.full_memory.bh
    out: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(targets), BATCH):
        x, c = targets[start:start + BATCH], coarse[start:start + BATCH]
        if memories is None:
            raw = model.maps(x, c)
            got = {f"M{own}": raw.memory, "L": raw.latent, "C": raw.coarse}
        else:
            got = {}
            for block, memory in memories.items():
                nearest = memory.readouts(x)
                readout = nearest[0]
                error = sum(((x - r) ** 2).mean(dim=1, keepdim=True) for r in nearest) / len(nearest)
                got[f"M{block}"] = model.to_image_size(error)
                if block == own:
                    f_real = model.discriminator.layer_features(x, model.cfg.latent_layer)
                    f_fake = model.discriminator.layer_features(readout, model.cfg.latent_layer)
                    got["L"] = model.to_image_size(((f_real - f_fake) ** 2).mean(dim=1, keepdim=True))
            got["C"] = model.coarse_map(c)
        for key, value in got.items():
            out.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def encoded(model: DAAD, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    parts = [model.encode(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def anomaly_map(model: DAAD, t: Dict[str, torch.Tensor], scale: Dict[str, float], blocks: Sequence[int]) -> torch.Tensor:
    beta, delta = model.cfg.memory_score_weight, model.cfg.coarse_memory_weight
    memory = sum(t[f"M{b}"] / scale[f"M{b}"] for b in blocks) / len(blocks)
    fine = (1 - beta) * t["L"] / scale["L"] + beta * memory
    return torch.cat([model.smooth(part) for part in ((1 - delta) * fine + delta * t["C"] / scale["C"]).split(BATCH)])


def is_inspect(model: Any) -> bool:
    """A hard-read fine memory of square blocks, L and C: what the rows rebuild and mix."""
    memory = model.generator.full_memory
    return bool(memory is not None and memory.hard and memory.bh == memory.bw and model.discriminator is not None
                and model.cfg.gamma <= 0 and model.coarse_memory is not None and model.cfg.backbone)


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_fine_memory")
    parser.add_argument("--rows", nargs="+", default=["4", "4:shift", "4:flip", "2+4", "4+8", "2+4+8"])
    args = parser.parse_args()
    rows_spec = [parse_row(r) for r in args.rows]

    model, spec, got_data = memory_probe_or_exit("probe_fine_memory", args, is_inspect, "an `inspect` checkpoint "
                                                 "(a hard-read fine memory of square blocks, L and C)")
    cfg, memory = model.cfg, model.generator.full_memory
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    with torch.no_grad():
        raw, _ = backbone_features(model, model.normalise_input(torch.from_numpy(load_images(got_data.train, spec))),
                                   cpu)
        bank = torch.cat([model.standardise(f) for f in raw.split(BATCH * 4)])
        stats_x, stats_c = statistics_targets(model, got_data.stats, spec, cpu)
    del raw
    encoded_views = {view: encoded(model, x) for view, x in got_data.tensor_views(args.transplant).items()}

    rows = []
    trained_scores: Dict[str, object] = {}
    specs: List[Tuple[str, RowSpec]] = [("trained", RowSpec((memory.bh,), (), "cosine", 1))]
    specs += list(zip(args.rows, rows_spec))
    for name, row in specs:
        blocks = row.blocks
        memories = None if name == "trained" else \
            {b: Memory(memory_items(bank - image_means(bank) if row.centre else bank, b, row.augment), b, row.metric,
                       row.k, row.centre) for b in sorted(set(blocks) | {memory.bh})}
        items = {f"M{b}": len(m.items) for b, m in memories.items()} if memories else {f"M{memory.bh}": memory.items.shape[0]}
        scale = {k: float(v.mean()) or 1.0 for k, v in terms(model, stats_x, stats_c, memories).items()}
        for view, (x, c) in encoded_views.items():
            amap = anomaly_map(model, terms(model, x, c, memories), scale, blocks)
            scores, got = map_row(model, amap, got_data.labels, got_data.types, got_data.masks, row=name, items=items,
                                  view=view)
            rows.append(got)
            if name == "trained":
                trained_scores[view] = scores
            elif got_data.groups is not None:  # how sure this row's image-AUROC difference from the trained memory's is
                got["minus_trained_image_auroc"] = group_bootstrap_auroc_difference(
                    got_data.labels, trained_scores[view], scores, got_data.parts())
            print_row(got, t0)

    print(f"\n{got_data.summary(args.checkpoint, args.split)}; beta {cfg.memory_score_weight:g}, delta "
          f"{cfg.coarse_memory_weight:g}; {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("row", "16s"), Column("items", "8d", lambda r: sum(r["items"].values())), VIEW, *METRICS],
                interval="minus_trained_image_auroc")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
