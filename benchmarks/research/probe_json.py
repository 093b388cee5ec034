"""Where a probe's rows go: one JSON per run under its --out folder, named by split and time."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List


def write_probe_rows(out: Path, args: argparse.Namespace, rows: List[Dict[str, Any]]) -> Path:
    """`out`/probe_<split>_<unix time>.json with the run's arguments and rows; prints and returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"probe_{args.split}_{int(time.time())}.json"
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
    print(f"\nJSON: {path}")
    return path
