"""daad-engine: build, check, benchmark and describe model bundles on the device.

Every user-facing error is one line on stderr and exit status 1 (engine.errors.DaadError);
a traceback means a bug.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from .backend import BACKEND_CHOICES, open_backend
from .bundle import Bundle, atomic_write_text, load_bundle
from .cli_types import positive_int
from .errors import DaadError
from .messages import EXIT_ERROR, error, run_tool, setup_tool_logging, warning
from .plan_cache import ENV_CACHE_DIR, PRECISIONS, PlanCache
from .trt_build import DEFAULT_WORKSPACE_MB

logger = logging.getLogger(__name__)

PROG = "daad-engine"
EXIT_OK = 0
LOG_LEVELS = ("debug", "info", "warning", "error")

BUILD_EPILOG = f"""\
The plan is built for this GPU and this TensorRT version and stored, with its key, under the cache
directory (--cache-dir, else ${ENV_CACHE_DIR}, else systemd's $CACHE_DIRECTORY/plans, else
~/.cache/daad-inspect/plans). A plan from another GPU, TensorRT version, precision or bundle is
never loaded: it is rebuilt. The plan's path is printed on stdout.

INT8 needs --calib-images DIR: 100-500 good frames from the station (same camera and lighting).

On a machine without TensorRT, build exits 1 with a message. With --allow-missing-tensorrt it exits 0
instead (daad-agent then scores with ONNX Runtime); real build failures still exit 1. In the agent's
systemd unit (CacheDirectory=daad-inspect sets $CACHE_DIRECTORY):
  ExecStartPre=/opt/daad/venv/bin/daad-engine build /var/lib/daad-inspect/bundle \\
      --precision fp16 --if-missing --allow-missing-tensorrt
  TimeoutStartSec=20min        # a first build takes minutes on a Jetson
"""


def _bundle_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (model.onnx + bundle.yaml) written by `daad-train export`")



def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build TensorRT plans for a DAAD model bundle, check a bundle's graph, benchmark backends, "
                    "and show bundle metadata. `daad-engine COMMAND --help` is the manual of each command.",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="log verbosity on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("build", help="build (or find) the TensorRT plan for this device",
                       description="Build the TensorRT plan of a bundle on the device that will run it.",
                       epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _bundle_arg(p)
    p.add_argument("--precision", choices=PRECISIONS, required=True,
                   help="engine precision; fp16 fails clearly where the GPU has no fast FP16 (no silent fallback)")
    p.add_argument("--calib-images", type=Path, metavar="DIR", help="good frames for INT8 calibration (int8 only)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="plan cache directory (see below for the default)")
    p.add_argument("--workspace-mb", type=positive_int, default=DEFAULT_WORKSPACE_MB, metavar="N",
                   help=f"TensorRT builder workspace limit in MiB (default: {DEFAULT_WORKSPACE_MB})")
    p.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="batch size; the bundle must contain a graph exported at this batch (default: 1)")
    p.add_argument("--if-missing", action="store_true", help="exit 0 at once when a matching plan exists")
    p.add_argument("--allow-missing-tensorrt", action="store_true",
                   help="exit 0 (with a notice) where TensorRT is not installed, so ONNX Runtime is used")

    p = sub.add_parser("check", help="static check that the bundle's graphs build in TensorRT 8.5/8.6/10.x",
                       description="Check, without a GPU, that every graph of the bundle uses opset <= 17, static "
                                   "shapes, operators on TensorRT's ONNX support list (8.5 and 10.x) and supported "
                                   "dtypes, within TensorRT's limits (TopK K <= 3840 and an initializer, sorted; no "
                                   "INT32 into TopK/ArgMax/ArgMin/MatMul; Resize modes), and matches bundle.yaml. "
                                   "Exits 1 naming each offending node. Needs the onnx package. With --fp16-parity, "
                                   "also scores the images with the graph converted to float16 and with float32 "
                                   "(ONNX Runtime, CPU) and exits 1 when a verdict differs or a map drifts beyond "
                                   "the tolerance (needs onnxconverter-common).")
    _bundle_arg(p)
    p.add_argument("--fp16-parity", nargs="+", type=Path, metavar="IMAGE",
                   help="images (or folders of images) to compare FP16 and FP32 on, e.g. a few good and defective parts")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="image threshold (thresholds.yaml image_threshold): FP16 must flag exactly the images FP32 "
                        "flags (score > T); without it the scores are only reported")
    p.add_argument("--map-tolerance", type=float, default=None, metavar="R",
                   help="allowed |map16 - map32| as a fraction of max(1, max |map32|) (default: 0.01)")

    p = sub.add_parser("sign", help="sign the bundle with the release key (Ed25519): writes BUNDLE/bundle.sig",
                       description="Verify the bundle (hashes, manifest, graph against bundle.yaml), then sign its "
                                   "manifest with an Ed25519 private key (PEM) into BUNDLE/bundle.sig. An agent whose "
                                   "config sets model.public_key refuses a bundle without a valid signature. Make "
                                   "the key once with `openssl genpkey -algorithm ed25519 -out release.key`, its "
                                   "public half with `openssl pkey -in release.key -pubout -out release.pub`. "
                                   "Needs the cryptography package (the `signing` extra).")
    _bundle_arg(p)
    p.add_argument("--key", type=Path, required=True, metavar="PEM", help="the Ed25519 private key")

    p = sub.add_parser("bench", help="latency/throughput of a backend on synthetic frames",
                       description="Time a backend on real preprocessed synthetic frames (after a warm-up) and print "
                                   "backend, p50/p99/mean latency, fps and peak memory.")
    _bundle_arg(p)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: TensorRT where a plan exists, else ONNX Runtime (default: auto)")
    p.add_argument("--iterations", type=positive_int, default=200, metavar="N", help="timed batches (default: 200)")
    p.add_argument("--warmup", type=_non_negative_int, default=20, metavar="N", help="untimed batches first (default: 20)")
    p.add_argument("--batch", type=positive_int, default=1, metavar="N", help="batch size (default: 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT plan precision (default: fp32)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="plan cache directory")
    p.add_argument("--build-if-missing", action="store_true", help="build the TensorRT plan when none is cached")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")

    p = sub.add_parser("info", help="print bundle metadata and verify its hashes",
                       description="Print the bundle's metadata, verify every graph's SHA-256 and list the plans "
                                   "cached for it.")
    _bundle_arg(p)
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="plan cache directory to list plans from")
    return parser


def cmd_build(args: argparse.Namespace) -> int:
    from .trt_build import TensorRTUnavailableError, build_plan

    bundle = load_bundle(args.bundle)
    try:
        path = build_plan(bundle, precision=args.precision, cache_dir=args.cache_dir, calib_images=args.calib_images,
                          workspace_mb=args.workspace_mb, batch=args.batch, if_missing=args.if_missing)
    except TensorRTUnavailableError as exc:
        if args.allow_missing_tensorrt:
            warning(PROG, f"no plan built: {exc}")
            return EXIT_OK
        raise DaadError(f"{exc}; pass --allow-missing-tensorrt to exit 0 here instead") from exc
    print(path)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_bundle

    bundle = load_bundle(args.bundle)
    problems = check_bundle(bundle)
    for problem in problems:
        print(problem)
    parity_ok = True
    if args.fp16_parity:
        from .fp16_parity import MAP_TOLERANCE, fp16_parity

        tolerance = MAP_TOLERANCE if args.map_tolerance is None else args.map_tolerance
        if not tolerance > 0:
            raise DaadError(f"--map-tolerance must be > 0, got {tolerance}")
        report = fp16_parity(bundle, args.fp16_parity, threshold=args.threshold, tolerance=tolerance)
        print("\n".join(report.lines()))
        parity_ok = report.ok
        if not parity_ok:
            why = (f"verdicts differ on {', '.join(report.verdicts_differ)}" if report.verdicts_differ
                   else "the FP16 map drifts beyond the tolerance")
            print(f"{PROG} check: FP16 does not score {bundle.root} as FP32 does ({why}); build with --precision "
                  "fp32 or re-export the model so its values stay within float16", file=sys.stderr)
    if problems:
        error(PROG, f"{len(problems)} problem(s) in {bundle.root}; TensorRT would refuse this bundle")
        return EXIT_ERROR
    if not parity_ok:
        return EXIT_ERROR
    files = ", ".join(g.file for g in bundle.graphs)
    print(f"OK: {bundle.root} ({files}) should parse in TensorRT 8.5, 8.6 and 10.x"
          + (" and scores the same in FP16" if args.fp16_parity else ""))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, format_table

    bundle = load_bundle(args.bundle)
    with open_backend(bundle, prefer=args.backend, batch=args.batch, precision=args.precision,
                      plan_cache=args.cache_dir, build_if_missing=args.build_if_missing) as backend:
        result = bench(backend, n_warmup=args.warmup, n_iter=args.iterations)
    print(format_table([result]))
    if args.json is not None:
        try:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise DaadError(f"{args.json}: cannot write the JSON results ({exc.strerror or exc})") from exc
    return EXIT_OK


def _describe(bundle: Bundle, cache: PlanCache) -> List[str]:
    meta = bundle.metadata
    spec = bundle.preprocess
    lines = [
        f"bundle:          {bundle.root}",
        f"name:            {bundle.name}",
        f"format_version:  {meta.get('format_version')}",
        f"created:         {meta.get('created', '?')}",
        f"opset:           {bundle.opset}",
        f"input:           {bundle.input_name} float32 NCHW {list(bundle.input_shape())}",
        f"preprocess:      {spec.channel_order}, {spec.height}x{spec.width} ({spec.resize}), "
        f"mean {list(spec.mean)}, std {list(spec.std)}",
        f"outputs:         anomaly_map={bundle.map_output}, score={bundle.score_output}",
        f"identity:        {bundle.sha256} "
        f"({'manifest over bundle.yaml and graphs, verified' if bundle.manifest_sha256 else 'batch-1 graph: no manifest, re-export'})",
        "graphs (SHA-256 verified):",
    ]
    for g in bundle.graphs:
        size = (bundle.root / g.file).stat().st_size
        lines.append(f"  batch {g.batch}: {g.file}  {size / 1e6:.2f} MB  {g.sha256}")
    for title, key in (("model", "model"), ("score_stats", "score_stats"), ("metrics", "metrics"),
                       ("training_data", "training_data"), ("software", "software")):
        value = meta.get(key)
        if value:
            dumped = yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip()
            lines.append(f"{title}:")
            lines.extend("  " + line for line in dumped.splitlines())
    plans = [(k, p) for g in bundle.graphs for k, p in cache.plans_for(g.sha256)]
    lines.append(f"plans cached in {cache.root}: {len(plans) or 'none'}")
    for key, path in plans:
        lines.append(f"  {key.describe()}: {path}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle, verify=True)
    print("\n".join(_describe(bundle, PlanCache(args.cache_dir))))
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from .signing import sign_bundle

    bundle = load_bundle(args.bundle)
    print(sign_bundle(bundle, args.key))
    return EXIT_OK


COMMANDS = {"build": cmd_build, "check": cmd_check, "bench": cmd_bench, "info": cmd_info, "sign": cmd_sign}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging(PROG, getattr(logging, args.log_level.upper()))
    return run_tool(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())

