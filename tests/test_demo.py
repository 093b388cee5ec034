"""The README's first command, shortened: every stage runs for real and defect events arrive."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_delivers_defect_events(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # the default model, calibrated through the same camera: every defective part caught, at most one false alarm
    assert summary["caught"] == summary["defective_frames"] >= 1 and summary["false_alarms"] <= 1, summary
    for event in summary["events_received"]:
        assert event["station"] == "demo" and event["image_score"] > event["image_threshold"]
    assert (out / "eval" / "roc.png").is_file()
    assert (out / "calibration" / "report" / "report.html").is_file() and (out / "eval" / "report.html").is_file()
    assert "next: daad-calibrate fit " in proc.stdout and "--false-alarm-rate 2%" in proc.stdout  # what it then runs
    assert (out / "bundle" / "bundle.yaml").is_file()
    assert any((out / "defect-frames").rglob("*.jpg"))
    assert "what the subscriber received" in proc.stdout
