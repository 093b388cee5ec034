"""What DAAD+'s discriminator adds: its feature distances scored as anomaly maps, against an untrained twin.

    python -m benchmarks.research.probe_discriminator --checkpoint RUN/last.pt --data ../shared/datasets/magnetic_tile \
        --split val --out benchmarks/results/probe_discriminator

For a trained DAAD+ with a full-resolution memory, the map L_d = ||f_d(x) - f_d(y)||^2 (f_d the
discriminator's features after layer d, upsampled; y the decoder's reconstruction, as in the paper's
score, or the memory's read-out) is scored like the model's own map (smoothing and top-k of its config),
next to M (the memory's rebuild error) and to mixes of M and L_d. The same distances through a
discriminator of the same shape with random weights are the control: where they score as well, the gain
is the network's multi-scale comparison, not what adversarial training taught it. With --transplant
every row is also scored on the split's defects pasted onto its good images.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.research.probe_protocol import held_back_good, load_checkpoint, probe_parser, refuse
from benchmarks.research.probe_report import IMAGE, col, print_row, print_table, write_probe_rows

from engine.errors import DaadError
from train.checkpoint import score_stats_images
from train.data import load_images
from train.evaluate import compute_metrics, load_split
from train.model import DAAD, Discriminator
from train.preprocessing import preprocess_spec
from train.transplant import transplant_set

BATCH = 16
BETAS = (0.5, 0.25)  # weight of M in the mixes M and L_d


def layer_features(disc: Discriminator, x: torch.Tensor) -> List[torch.Tensor]:
    """The discriminator's feature maps after each of its LeakyReLUs (one per strided layer)."""
    out, h = [], x
    for layer in disc.features:
        h = layer(h)
        if isinstance(layer, torch.nn.LeakyReLU):
            out.append(h)
    return out


@torch.no_grad()
def raw_maps(model: DAAD, control: Discriminator, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Unsmoothed (N, 1, H, W) maps: M, and L_d of both discriminators against read-out and reconstruction."""
    maps: Dict[str, List[torch.Tensor]] = {}
    for start in range(0, len(images), BATCH):
        x = model.targets(images[start:start + BATCH])
        recon, readout = model.generator.rebuild(x)
        maps.setdefault("M", []).append(model.to_image_size(((x - readout) ** 2).mean(dim=1, keepdim=True)))
        for name, disc in (("trained", model.discriminator), ("untrained", control)):
            fx = layer_features(disc, x)
            for other_name, other in (("read-out", readout), ("reconstruction", recon)):
                for d, (a, b) in enumerate(zip(fx, layer_features(disc, other)), start=1):
                    key = f"L{d} {name} D vs {other_name}"
                    maps.setdefault(key, []).append(model.to_image_size(((a - b) ** 2).mean(dim=1, keepdim=True)))
    return {k: torch.cat(v) for k, v in maps.items()}


def main() -> int:
    parser = probe_parser(__doc__, "benchmarks/results/probe_discriminator", groups=False)
    parser.add_argument("--seed", type=int, default=1, help="seed of the untrained discriminator")
    args = parser.parse_args()

    try:
        model, state = load_checkpoint(args.checkpoint)
    except DaadError as err:
        refuse("probe_discriminator", err)
    model.eval()
    if model.discriminator is None or model.generator.full_memory is None:
        refuse("probe_discriminator", f"{args.checkpoint}: needs a DAAD+ with a full-resolution memory (adversarial "
               "and full_skip_block)")
    torch.manual_seed(args.seed)
    control = Discriminator(model.cfg.target_channels, model.cfg.disc_channels).eval()
    data = Path(args.data)
    spec = preprocess_spec(model.cfg)
    _, images, masks, labels, types = load_split(data, spec, args.split)
    views = {"test/": images}
    if args.transplant:
        views["transplant"] = transplant_set(images, masks, labels)[0]

    t0 = time.perf_counter()
    # each map's normalisation: its mean on the good images fit() held back from the memory (the images
    # the memory was drawn from rebuild themselves exactly, so their means are ~0 and would skew the mixes)
    good = held_back_good(state, data)
    train_images = torch.from_numpy(load_images(good, spec))
    scale = {k: float(v.mean()) for k, v in raw_maps(model, control, train_images).items()}
    rows = []
    for view, view_images in views.items():
        maps = {k: v / scale[k] for k, v in raw_maps(model, control, torch.from_numpy(view_images)).items()}
        named = dict(maps)
        for key in [k for k in maps if k.endswith("D vs read-out") and not k.startswith("L4")]:  # both D: mixes get a control too
            for beta in BETAS:
                named[f"{beta:g} M + {1 - beta:g} {key}"] = beta * maps["M"] + (1 - beta) * maps[key]
        for name, m in named.items():
            amap = model.smooth(m)
            score = model.image_score(amap)
            got = compute_metrics(labels, types, score.numpy(), amap[:, 0].numpy(), masks)
            rows.append({"map": name, "view": view, "image_auroc": got["image_auroc"], "pixel_auroc": got["pixel_auroc"],
                         "per_type": got["image_auroc_per_type"]})
            print_row(rows[-1])

    held = "held back by fit" if score_stats_images(state) else "every 4th training image"
    print(f"\nnormalised on {len(good)} good images ({held})")
    print(f"\n{Path(args.checkpoint)}: split `{args.split}`, score = the model's own (top {model.cfg.score_topk:g}, "
          f"sigma {model.cfg.smoothing_sigma:g}); {time.perf_counter() - t0:.0f} s")
    print_table(rows, [col("map", "52s"), col("view", "10s"), IMAGE, col("pixel_auroc", "6.3f", "pixel")],
                per_type="per_type")
    write_probe_rows(Path(args.out), args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
