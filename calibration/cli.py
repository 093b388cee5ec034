"""`daad-calibrate`: set the thresholds on site.

    daad-calibrate capture --config /etc/daad-inspect/agent.yaml --frames 300 --interval 1 --out cal/
    daad-calibrate capture --images good/ --bundle bundle/ --out cal/
    daad-calibrate fit cal/ --false-alarm-rate 1% [--defects mvtec_dir/] [--out thresholds.yaml]
    daad-calibrate check thresholds.yaml --bundle bundle/ --images more_good/ [--list]
    daad-calibrate teach --bundle bundle/ --images new_normal/ --out bundle-taught/   (then capture + fit again)
    daad-calibrate teach --bundle bundle/ --events ID [ID ...] --frames-dir /var/lib/daad-inspect/frames --out bundle-taught/
    daad-calibrate undo --bundle bundle-taught/ [--config /etc/daad-inspect/agent.yaml]

Every error is one line naming the file, the field and the fix, with exit status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from engine.cli_types import positive_int
from engine.messages import run_tool, setup_tool_logging, warning

logger = logging.getLogger(__name__)
PROG = "daad-calibrate"

DEFAULT_CAMERA_FRAMES = 300  # resolves a 1% false-alarm rate (3/N) with margin
THRESHOLDS_FILE = "thresholds.yaml"
REPORT_DIR = "report"
BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16")


def parse_rate(text: str) -> float:
    """`0.01` or `1%` -> 0.01."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a rate like 1% (or 0.01)") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a rate between 0% and 100%, e.g. 1% (or 0.01)")
    return value



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Set the thresholds of a bundle on site from good frames.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (backend choice, files)")
    sub = parser.add_subparsers(dest="command", metavar="{capture,fit,check,teach,undo}")
    sub.required = True

    cap = sub.add_parser("capture", help="score good frames and keep them with their scores and anomaly maps",
                         description="Grab N frames of good parts (from the agent's camera or an image folder), score "
                                     "them with the bundle and save frames, scores, maps and capture.yaml in --out.")
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="agent config: use its camera, bundle and backend")
    src.add_argument("--images", type=Path, help="folder of good-part images (needs --bundle)")
    cap.add_argument("--bundle", type=Path, help="bundle directory (with --images)")
    cap.add_argument("--frames", type=positive_int, default=None,
                     help=f"frames to capture (default: all images with --images, {DEFAULT_CAMERA_FRAMES} from a camera)")
    cap.add_argument("--interval", type=float, default=0.0,
                     help="camera: at least this many seconds between kept frames, so they show different parts")
    cap.add_argument("--out", type=Path, required=True, help="capture folder to create")
    cap.add_argument("--backend", choices=BACKENDS, default="auto", help="with --images: inference backend (as the agent's)")
    cap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="with --images: TensorRT precision (as the agent's)")
    cap.add_argument("--force", action="store_true", help="replace a capture already in --out")

    fit = sub.add_parser("fit", help="fit thresholds.yaml to a capture for a target false-alarm rate",
                         description="Image threshold for a target false-alarm rate, pixel threshold and minimum defect "
                                     "area from a capture of good frames; thresholds.yaml plus a report.")
    fit.add_argument("capture", type=Path, help="capture folder written by `daad-calibrate capture`")
    fit.add_argument("--false-alarm-rate", type=parse_rate, required=True, metavar="R",
                     help="target share of good parts flagged, e.g. 1%% (or 0.01)")
    fit.add_argument("--strategy", choices=("auto", "quantile", "gpd", "best_f1"), default="auto",
                     help="auto: empirical quantile where the frames resolve R, else a generalised Pareto tail fit when "
                          "sound; best_f1 needs --defects")
    fit.add_argument("--bundle", type=Path, help="bundle the capture was made with (checked; needed with --defects "
                                                 "if the capture's bundle path moved)")
    fit.add_argument("--defects", type=Path, help="labelled defects, MVTec layout: test/<type>/*.png")
    fit.add_argument("--out", type=Path, help=f"thresholds file (default: CAPTURE/{THRESHOLDS_FILE})")
    fit.add_argument("--report", type=Path, help=f"report folder (default: CAPTURE/{REPORT_DIR})")
    fit.add_argument("--no-report", action="store_true", help="write thresholds.yaml only")
    fit.add_argument("--backend", choices=BACKENDS, default="auto", help="backend for scoring --defects")
    fit.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT precision for scoring --defects")

    chk = sub.add_parser("check", help="dry run: what the agent would flag on a folder of images",
                         description="Score a folder of images with the bundle and count what the agent would flag "
                                     "with these thresholds.")
    chk.add_argument("thresholds", type=Path, help="thresholds.yaml")
    chk.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    chk.add_argument("--images", type=Path, required=True, help="folder of images")
    chk.add_argument("--list", action="store_true", help="one line per frame: score, verdict, regions")
    chk.add_argument("--backend", choices=BACKENDS, default="auto", help="inference backend")
    chk.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT precision")

    teach = sub.add_parser("teach", help="add new normal variation to the bundle's memory (a new bundle)",
                           description="Add the normal feature blocks of good frames the model flags (a new batch, a "
                                       "new lamp) to the bundle's memory and write a new bundle to --out; the bundle "
                                       "taught from is kept unchanged (to undo, point the agent back at it). The new "
                                       "bundle needs new thresholds: capture and fit again.")
    teach.add_argument("--bundle", type=Path, required=True, help="bundle directory to teach (left unchanged)")
    what = teach.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", type=Path, help="folder of good frames to teach")
    what.add_argument("--events", nargs="+", metavar="ID", help="defect event ids (false alarms) whose frames the "
                      "agent saved: teach those frames (needs --frames-dir)")
    teach.add_argument("--frames-dir", type=Path, help="with --events: the agent's frames.dir (agent.yaml)")
    teach.add_argument("--out", type=Path, required=True, help="new bundle directory (must not exist, or be empty)")

    und = sub.add_parser("undo", help="go back to the bundle a taught bundle was taught from",
                         description="Check that the bundle a taught bundle was taught from is still there, unchanged "
                                     "(its recorded digest), and print it; with --config, point the agent config's "
                                     "model.bundle back at it (the file's other lines kept). The agent then needs "
                                     "that bundle's own thresholds.yaml again, or a new calibration.")
    und.add_argument("--bundle", type=Path, required=True, help="the taught bundle (bundle.yaml has `taught`)")
    und.add_argument("--config", type=Path, help="agent config whose model.bundle is the taught bundle: rewritten")
    return parser


def cmd_capture(args: argparse.Namespace) -> int:
    from .capture import CaptureError, capture_from_config, capture_from_images

    if args.config is not None:
        if args.bundle is not None:
            raise CaptureError("--bundle goes with --images; with --config the bundle is the config's model.bundle")
        capture = capture_from_config(args.config, args.out, args.frames or DEFAULT_CAMERA_FRAMES, args.interval, args.force)
    else:
        if args.bundle is None:
            raise CaptureError(f"{args.images}: --images needs --bundle BUNDLE_DIR (the model that scores the frames)")
        capture = capture_from_images(args.images, args.bundle, args.out, args.frames, args.backend, args.force,
                                      precision=args.precision)
    q = capture.meta.get("score_quantiles", {})
    print(f"captured {capture.n} frames into {capture.root} "
          f"(scores: median {q.get('p50', float('nan')):.5g}, p99 {q.get('p99', float('nan')):.5g}, max {q.get('max', float('nan')):.5g})")
    for w in capture.meta.get("warnings", []):
        warning(PROG, w)
    print(f"next: daad-calibrate fit {capture.root} --false-alarm-rate RATE  (RATE: the share of good parts you "
          "accept being flagged, e.g. 1%)")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from engine.bundle import load_bundle

    from .capture import CaptureError, load_capture
    from .fit import fit_thresholds, score_defect_dataset, summary_lines, write_thresholds

    bundle = load_bundle(args.bundle) if args.bundle is not None else None
    capture = load_capture(args.capture, bundle)
    defects = None
    if args.defects is not None:
        if bundle is None:
            recorded = (capture.meta.get("bundle") or {}).get("path")
            if not recorded or not Path(recorded).is_dir():
                raise CaptureError(f"{args.capture}: the bundle it was captured with ({recorded}) is not there; "
                                   f"pass --bundle BUNDLE_DIR to score --defects")
            bundle = load_bundle(recorded)
            capture = load_capture(args.capture, bundle)  # still the same model?
        defects = score_defect_dataset(args.defects, bundle, backend=args.backend, precision=args.precision)
    result = fit_thresholds(capture, args.false_alarm_rate, args.strategy, defects,
                            score_stats=bundle.score_stats if bundle is not None else None)
    out = args.out or (capture.root / THRESHOLDS_FILE)
    write_thresholds(result, out)
    for line in summary_lines(result, capture):
        print(line)
    print(f"wrote {out}")
    if not args.no_report:
        from .report import write_report

        html = write_report(result, capture, args.report or (capture.root / REPORT_DIR), defects, thresholds_path=out)
        print(f"report {html}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_lines, run_check

    result = run_check(args.thresholds, args.bundle, args.images, backend=args.backend, precision=args.precision)
    for line in check_lines(result, list_frames=args.list):
        print(line)
    return 0


def cmd_teach(args: argparse.Namespace) -> int:
    from .teach import TeachError, frames_for_events, summary_lines, teach_bundle

    if args.events is not None:
        if args.frames_dir is None:
            raise TeachError("--events needs --frames-dir DIR: the agent's frames.dir (agent.yaml), where it saved "
                             "the flagged frames")
        result = teach_bundle(args.bundle, frames_for_events(args.frames_dir, args.events), args.out, events=args.events)
    else:
        if args.frames_dir is not None:
            raise TeachError("--frames-dir goes with --events; with --images the folder is the frames")
        result = teach_bundle(args.bundle, args.images, args.out)
    for line in summary_lines(result):
        print(line)
    return 0


def cmd_undo(args: argparse.Namespace) -> int:
    from .undo import summary_lines, undo

    for line in summary_lines(undo(args.bundle, args.config)):
        print(line)
    return 0


COMMANDS = {"capture": cmd_capture, "fit": cmd_fit, "check": cmd_check, "teach": cmd_teach, "undo": cmd_undo}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging(PROG, logging.INFO if args.verbose else logging.WARNING)
    return run_tool(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
