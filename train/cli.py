"""`daad-train`: fit, eval and export on the desktop.

    daad-train fit --data DIR [--model inspect|daad_plus|...] --out runs/x [--steps N] [--resume] [--views plain]
    daad-train eval --checkpoint runs/x/last.pt --data DIR --out runs/x/eval [--split val|test] [--thresholds T.yaml]
    daad-train fit/eval ... --groups GROUPS.csv   (train.groups: score only parts the model never trained on)
    daad-train combine --checkpoints runs/x/last.pt runs/y/last.pt --out runs/xy   (their mean map, one model)
    daad-train export --checkpoint runs/x/last.pt --out bundle/ [--batch 8] [--parity-images DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple


from engine.errors import ConfigError, DatasetError
from engine.messages import run_tool, setup_tool_logging

from .config import (INSPECT_DAAD_PLUS_NAME, INSPECT_NAME, ModelConfig, TrainConfig, model_config_file, preset,
                     preset_names, schedule)
from .data import has_colour, train_samples
from .views import DEFAULT_VIEWS, VIEWS, view_configs

if TYPE_CHECKING:
    from .groups import Groups

logger = logging.getLogger("train")
PROG = "daad-train"
WORST_PARTS = 5  # eval --groups prints the parts ranked lowest; metrics.json holds every part


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset, the YAML's `model:` overrides, then the flags; in_channels, where none of them sets it,
    follows the training images (3 for colour data, else 1)."""
    overrides: Dict[str, Any] = {}
    sets_channels = bool(args.channels_in)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        cfg, model_section = model_config_file(path, preset(args.model))
        sets_channels = sets_channels or "in_channels" in model_section
    else:
        cfg = preset(args.model)
    if args.size:
        overrides["image_size"] = (args.size, args.size)
    if getattr(args, "backbone", None) is not None:
        overrides["backbone"] = args.backbone
    if args.channels_in:
        overrides["in_channels"] = args.channels_in
    elif not sets_channels:
        channels = _channels_of(Path(args.data))
        if channels:
            overrides["in_channels"] = channels
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _channels_of(data: Path) -> int:
    """3 if the training images are in colour, 1 if gray; 0 if they cannot be read (fit() then reports
    the dataset's problem, after the config's own)."""
    try:
        channels = 3 if has_colour(train_samples(data)) else 1
    except DatasetError:
        return 0
    if _is_rank_0():  # under torchrun every process reads the data; one reports
        print(f"model.in_channels {channels}: the training images are {'in colour' if channels == 3 else 'gray'} "
              "(--channels-in chooses)")
    return channels


def _is_rank_0() -> bool:
    from .runtime import distributed_context

    return distributed_context()[0] == 0


def _schedule_for(args: argparse.Namespace) -> Tuple[int, float]:
    """--steps and --lr, each defaulting to the model's measured schedule."""
    default = schedule(args.model)
    return (args.steps or default["steps"]), (args.lr or default["lr"])


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit

    steps, lr = _schedule_for(args)
    if lr <= 0 or args.disc_lr < 0:
        flag, value = ("--lr", lr) if lr <= 0 else ("--disc-lr", args.disc_lr)
        raise ConfigError(f"{flag}: got {value:g}; a learning rate is positive (e.g. 1e-3; --disc-lr 0 means --lr's)")
    model_cfg = _model_config(args)
    train_cfg = TrainConfig(data=args.data, out=args.out, steps=steps, batch_size=args.batch_size, lr=lr,
                            seed=args.seed, device=args.device, amp=not args.no_amp, val_fraction=args.holdout,
                            checkpoint_every=args.checkpoint_every, groups=args.groups or "", disc_lr=args.disc_lr)
    names = fit_view_names(args, model_cfg)
    if len(names) > 1:
        from .combine import fit_views

        both = fit_views(model_cfg, train_cfg, names, resume=args.resume, progress=not args.quiet)
        if both.combined is not None:
            for name, view in zip(names, both.views):
                print(f"view {name}: {view.checkpoint} ({view.images_per_s:.1f} images/s)")
            print(f"checkpoint: {both.combined.checkpoint} (the mean map of {both.combined.n_views} views)")
        return 0
    if names:
        model_cfg = view_configs(model_cfg, names)[0][1]
    result = fit(model_cfg, train_cfg, resume=args.resume, progress=not args.quiet)
    if result.score_stats:
        print(f"checkpoint: {result.checkpoint}")
        if result.history:
            print(f"throughput: {result.images_per_s:.1f} images/s; final losses: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in result.history[-1].items() if k != "step"))
        else:
            print(f"features: {result.images_per_s:.1f} images/s; nothing trained")
    return 0


def fit_view_names(args: argparse.Namespace, cfg: ModelConfig) -> List[str]:
    """--views, or the model's default: `inspect_daad_plus` fits both views unless its config sets illumination_norm
    (then the config as given, one view); `inspect` and the paper columns one, as configured (no names)."""
    if args.views:
        return list(args.views)
    if args.model == INSPECT_DAAD_PLUS_NAME and not cfg.illumination_norm:
        return list(DEFAULT_VIEWS)
    return []


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .evaluate import evaluate

    from .report import calibrated_threshold

    calibrated = calibrated_threshold(Path(args.thresholds)) if args.thresholds else None  # before minutes of scoring
    model, state = load_model(args.checkpoint)
    groups = checked_groups(args.groups, Path(args.data), state, args.checkpoint) if args.groups else None
    metrics = evaluate(model, Path(args.data), Path(args.out), device=args.device, plot=not args.no_plots,
                       progress=not args.quiet, split=args.split, transplant=args.transplant, groups=groups,
                       calibrated=calibrated)
    print(json.dumps({k: metrics[k] for k in ("model", "image_auroc", "pixel_auroc", "aupro")}, default=float))
    print(f"per type: {json.dumps(metrics['image_auroc_per_type'], default=float)}")
    for name, got in metrics.get("image_auroc_group_intervals", {}).items():
        print(f"image AUROC, {name}: {got['auroc']:.3f} (95% over {got['groups']} parts resampled: "
              f"{got['low']:.3f} to {got['high']:.3f})")
    worst = metrics.get("parts", [])[:WORST_PARTS]
    if worst:
        print("parts ranked lowest (rank: the mean fraction of the other class's images that each of the part's "
              "images is ordered correctly against; 1 = all of them):")
        for part in worst:
            kind = "/".join(part["types"]) if part["defective"] else "good"
            images = f"{part['images']} image{'s' if part['images'] != 1 else ''}"
            print(f"  {part['part']}: {kind}, {images}, rank {part['rank']:.2f}")
    if "plots" in metrics:
        print(f"report: {metrics['plots']['report']} (metrics, per-type table, plots)")
    print(f"metrics and plots: {args.out}")
    return 0


def checked_groups(path: str, data: Path, state: Dict[str, Any], checkpoint: str) -> "Groups":
    """The groups file, if the checkpoint was fit on the same one: a model that trained on the held-out
    groups' siblings would be scored on images it has seen."""
    from .groups import load_groups

    groups = load_groups(Path(path), data)
    fitted = (state.get("training_data") or {}).get("groups_sha256") or ""
    if fitted != groups.sha256:
        how = "without a groups file" if not fitted else f"with another groups file (sha256 {fitted[:12]})"
        raise ConfigError(f"{checkpoint}: fit {how}, so it may have trained on the images {path} holds out; "
                          f"refit with `daad-train fit --groups {path}` or evaluate without --groups")
    return groups


def cmd_combine(args: argparse.Namespace) -> int:
    from .combine import combine

    result = combine([Path(p) for p in args.checkpoints], Path(args.out))
    stats = result.score_stats
    print(f"checkpoint: {result.checkpoint} (the mean map of {result.n_views} views)")
    print(f"score statistics on {stats['n']} held-back good images: p50 {stats['p50']:.4g}, p99 {stats['p99']:.4g}, "
          f"max {stats['max']:.4g}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engine.preprocess import list_images

    from .export import export_bundle

    parity_images: List[Path] = []
    if args.parity_images:
        parity_images = list_images(Path(args.parity_images))[: args.parity_count]
        if not parity_images:
            raise ConfigError(f"{args.parity_images}: no images for the parity check")
    metrics: Optional[Dict[str, Any]] = None
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text())
        metrics.pop("plots", None)
    batches = [1] + ([args.batch] if args.batch and args.batch > 1 else [])
    bundle = export_bundle(args.checkpoint, args.out, batches=batches, parity_images=parity_images, metrics=metrics)
    print(f"bundle: {bundle.root} ({bundle.name}, sha256 {bundle.sha256[:12]}, batches {list(bundle.batch_sizes)})")
    if "parity" in bundle.metadata:
        print(f"parity vs PyTorch: {bundle.metadata['parity']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    fit_p = sub.add_parser("fit", help="train a model on good images")
    fit_p.add_argument("--data", required=True, help="MVTec-layout dataset root or a folder of good images")
    fit_p.add_argument("--model", default=INSPECT_NAME, choices=preset_names(),
                       help="`inspect` (default): DAAD's block-wise memory on frozen features, nothing trained; "
                       "`inspect_daad_plus`: the trained DAAD+ on features; or a paper column preset")
    fit_p.add_argument("--config", help="YAML with a `model:` mapping of ModelConfig overrides")
    fit_p.add_argument("--out", default="runs/daad", help="run directory (checkpoint last.pt, log.jsonl)")
    fit_p.add_argument("--steps", type=int, help=f"optimiser steps of a trained model (default: "
                       f"{schedule(INSPECT_DAAD_PLUS_NAME)['steps']} for `inspect_daad_plus`, {TrainConfig.steps} for "
                       "the paper columns; `inspect` trains nothing)")
    fit_p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    fit_p.add_argument("--lr", type=float, help=f"Adam learning rate (default: "
                       f"{schedule(INSPECT_DAAD_PLUS_NAME)['lr']:g} for `inspect_daad_plus`, {TrainConfig.lr:g} for "
                       "the paper columns)")
    fit_p.add_argument("--disc-lr", type=float, default=TrainConfig.disc_lr,
                       help="the discriminator's learning rate (default: --lr's)")
    fit_p.add_argument("--size", type=int, help="square input size (multiple of 16)")
    fit_p.add_argument("--channels-in", type=int, choices=(1, 3),
                       help="1 gray, 3 RGB (default: 3 if the training images are in colour, else 1)")
    fit_p.add_argument("--backbone", choices=("", "efficientnet_lite0"), help="memories on frozen ImageNet features")
    fit_p.add_argument("--views", nargs="+", choices=sorted(VIEWS), metavar="VIEW",
                       help=f"fit one model per view and score the mean of their maps ({', '.join(sorted(VIEWS))}; "
                       f"default for `inspect_daad_plus`: {' '.join(DEFAULT_VIEWS)}, about twice the fit and "
                       "inference time of `--views plain`; `inspect`: one view); the fits go to OUT/views/VIEW, the combined checkpoint to OUT/last.pt")
    fit_p.add_argument("--seed", type=int, default=0)
    fit_p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    fit_p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    fit_p.add_argument("--holdout", type=float, default=0.0, help="fraction of good images held back (validation)")
    fit_p.add_argument("--groups", help="CSV `image,group` of images showing one part (train.groups): train on the "
                       "grouped protocol's images only, so that `eval --groups` scores parts the model never saw")
    fit_p.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    fit_p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with several views, each from OUT/views/VIEW/last.pt, then combine again)")
    fit_p.add_argument("--quiet", action="store_true", help="no progress bar")
    fit_p.set_defaults(func=cmd_fit)

    eval_p = sub.add_parser("eval", help="metrics and plots on an MVTec-layout test set")
    eval_p.add_argument("--checkpoint", required=True)
    eval_p.add_argument("--data", required=True)
    eval_p.add_argument("--out", required=True, help="directory for metrics.json and plots")
    eval_p.add_argument("--device", default="auto")
    eval_p.add_argument("--split", default="all", choices=("all", "val", "test"),
                        help="a fixed half of test/ per defect type: choose settings on val, report on test")
    eval_p.add_argument("--groups", help="the groups CSV the checkpoint was fit with: evaluate held-out parts "
                        "(good images of held-out groups; val/test halves of whole groups)")
    eval_p.add_argument("--transplant", action="store_true",
                        help="paste each defect onto a good image of the set (same background for good and defective)")
    eval_p.add_argument("--thresholds", help="thresholds.yaml from `daad-calibrate fit`: draw the threshold the agent "
                        "uses beside the best-F1 one, and judge the overlays' cases by it")
    eval_p.add_argument("--no-plots", action="store_true", help="metrics.json only (no PNGs, no report.html)")
    eval_p.add_argument("--quiet", action="store_true")
    eval_p.set_defaults(func=cmd_eval)

    comb_p = sub.add_parser("combine", help="several fits as one model scoring the mean of their maps")
    comb_p.add_argument("--checkpoints", nargs="+", required=True,
                        help="last.pt of fits with the same --data, --seed, --groups and input size (e.g. one with "
                        "model.illumination_norm); the first's image score scores the mean map")
    comb_p.add_argument("--out", required=True, help="run directory for the combined last.pt")
    comb_p.set_defaults(func=cmd_combine)

    exp_p = sub.add_parser("export", help="write the model bundle (model.onnx + bundle.yaml)")
    exp_p.add_argument("--checkpoint", required=True)
    exp_p.add_argument("--out", required=True, help="bundle directory")
    exp_p.add_argument("--batch", type=int, default=0, help="also export a fixed larger batch")
    exp_p.add_argument("--parity-images", help="folder of images to check ONNX Runtime vs PyTorch on")
    exp_p.add_argument("--parity-count", type=int, default=8)
    exp_p.add_argument("--metrics", help="metrics.json from `daad-train eval`, stored in the bundle")
    exp_p.set_defaults(func=cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging(PROG, logging.DEBUG if args.verbose else logging.WARNING)
    return run_tool(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
