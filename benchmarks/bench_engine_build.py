"""Bundle size, and TensorRT plan build time where TensorRT exists.

    python benchmarks/bench_engine_build.py [BUNDLE] [--precisions fp32,fp16] [--batch 1] [--json FILE]

Without BUNDLE, the 64x64 template bundle of the tests is made in a temporary directory.
Reported: size of each graph and of the whole bundle; time of the static check; and, with
TensorRT, per precision: a cold build (empty cache), a warm build (timing cache reused), the
`--if-missing` lookup, and the plan size. Without TensorRT the build rows say so.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bundle import Bundle, load_bundle  # noqa: E402
from engine.errors import DaadError  # noqa: E402


def bundle_sizes(bundle: Bundle) -> Dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(bundle.root.iterdir()) if p.is_file()}
    return {"files": files, "total_bytes": sum(files.values())}


def time_check(bundle: Bundle) -> Dict[str, Any]:
    try:
        from engine.check import check_bundle

        started = time.perf_counter()
        problems = check_bundle(bundle)
        return {"seconds": round(time.perf_counter() - started, 3), "problems": len(problems)}
    except DaadError as exc:
        return {"skipped": str(exc)}


def time_builds(bundle: Bundle, precisions: List[str], batch: int, workspace_mb: int) -> List[Dict[str, Any]]:
    from engine.trt_build import TensorRTUnavailableError, build_plan

    rows = []
    for precision in precisions:
        with tempfile.TemporaryDirectory(prefix="daad-plans-") as cache:
            row: Dict[str, Any] = {"precision": precision, "batch": batch}
            try:
                started = time.perf_counter()
                path = build_plan(bundle, precision, cache_dir=cache, batch=batch, workspace_mb=workspace_mb)
                row["cold_build_s"] = round(time.perf_counter() - started, 2)
                started = time.perf_counter()
                build_plan(bundle, precision, cache_dir=cache, batch=batch, workspace_mb=workspace_mb)
                row["warm_build_s"] = round(time.perf_counter() - started, 2)  # timing cache reused
                started = time.perf_counter()
                build_plan(bundle, precision, cache_dir=cache, batch=batch, workspace_mb=workspace_mb, if_missing=True)
                row["if_missing_s"] = round(time.perf_counter() - started, 3)
                row["plan_bytes"] = path.stat().st_size
            except TensorRTUnavailableError:
                row["skipped"] = "TensorRT is not importable here"
            except DaadError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, help="bundle directory (default: a fresh template bundle)")
    parser.add_argument("--precisions", default="fp32,fp16", help="comma-separated (default: fp32,fp16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--workspace-mb", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="daad-bundle-") as tmp:
        if args.bundle is None:
            from tests.bundle_factory import make_template_bundle

            bundle = make_template_bundle(Path(tmp) / "template", size=64, batches=(1, 4))
        else:
            bundle = load_bundle(args.bundle)
        result = {
            "bundle": bundle.name,
            "size": bundle_sizes(bundle),
            "check": time_check(bundle),
            "builds": time_builds(bundle, args.precisions.split(","), args.batch, args.workspace_mb),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
