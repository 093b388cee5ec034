"""`daad-calibrate` as a technician runs it: real processes, real files, the template bundle.

Bad input must end with exit status 1 (argparse usage errors: 2), one message naming the path, no traceback.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import yaml

from engine.thresholds import load_thresholds
from engine.bundle import Bundle, load_bundle
from tests.bundle_factory import make_template_bundle
from train.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 40


def calibrate(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration", *map(str, args)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, template_bundle: Bundle) -> Dict[str, Path]:
    """A labelled synthetic dataset and one capture of its good images, made through the CLI."""
    root = tmp_path_factory.mktemp("site")
    write_synthetic_dataset(root / "ds", n_train=0, n_test_good=N_GOOD, n_test_per_defect=3, seed=5)
    proc = calibrate("capture", "--images", root / "ds" / "test" / "good", "--bundle", template_bundle.root,
                     "--out", root / "cap")
    assert proc.returncode == 0, proc.stderr
    assert f"captured {N_GOOD} frames" in proc.stdout
    # the next step names no rate of its own (the demo then fitted at another): the user chooses it
    assert f"next: daad-calibrate fit {root / 'cap'} --false-alarm-rate RATE" in proc.stdout
    return {"root": root, "ds": root / "ds", "cap": root / "cap", "bundle": Path(template_bundle.root)}


@pytest.fixture(scope="module")
def fitted(site) -> Path:
    """thresholds.yaml fitted to the capture at a 10% target (no report)."""
    path = site["root"] / "fitted.yaml"
    proc = calibrate("fit", site["cap"], "--false-alarm-rate", "0.1", "--out", path, "--no-report")
    assert proc.returncode == 0, proc.stderr
    return path


def test_capture_writes_frames_scores_maps_and_provenance(site, template_bundle) -> None:
    cap = site["cap"]
    meta = yaml.safe_load((cap / "capture.yaml").read_text())
    assert meta["bundle"]["sha256"] == template_bundle.sha256
    assert meta["n_frames"] == N_GOOD and meta["frame_sizes"] == {"128x128": N_GOOD}
    assert meta["source"]["kind"] == "images" and meta["map_size"] == [64, 64]
    assert len(list((cap / "frames").glob("*.png"))) == N_GOOD
    rows = (cap / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("index,frame,source,score,map_max") and len(rows) == N_GOOD + 1
    with np.load(str(cap / "maps.npz")) as data:
        assert data["maps"].shape == (N_GOOD, 64, 64) and data["scores"].shape == (N_GOOD,)


def test_fit_writes_thresholds_and_a_readable_report(site, template_bundle) -> None:
    out, report = site["root"] / "thresholds.yaml", site["root"] / "report"
    proc = calibrate("fit", site["cap"], "--false-alarm-rate", "10%", "--defects", site["ds"],
                     "--bundle", site["bundle"], "--out", out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "image threshold" in proc.stdout and "95% interval" in proc.stdout and "miss rate all" in proc.stdout
    t = load_thresholds(out, template_bundle)
    assert t.target_false_alarm_rate == 0.1 and t.n_frames == N_GOOD and t.strategy == "quantile"
    assert set(t.provenance["defects"]["images"]) == {"crack", "pit", "scratch", "spot"}
    html = (report / "report.html").read_text()
    for png in ("histogram.png", "tail.png", "good_overlays.png"):
        assert f'src="{png}"' in html
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "report.md").is_file()


def test_fit_warns_when_the_frames_cannot_resolve_the_rate(site) -> None:
    proc = calibrate("fit", site["cap"], "--false-alarm-rate", "0.001", "--out", site["root"] / "t_low.yaml", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert f"{N_GOOD} good frames cannot resolve a false-alarm rate of 0.1%" in proc.stdout  # rates in percent
    assert "at least 3000 good frames" in proc.stdout


def test_check_counts_what_the_agent_would_flag(site, fitted) -> None:
    proc = calibrate("check", fitted, "--bundle", site["bundle"], "--images", site["ds"] / "test" / "pit", "--list")
    assert proc.returncode == 0, proc.stderr
    assert "flagged      3 of 3 frames" in proc.stdout  # pits are the template model's easiest defect
    assert proc.stdout.count("FLAGGED") == 3


def test_capture_from_the_agent_config(site, tmp_path) -> None:
    """--config: the agent's own camera section (here a folder source), bundle and backend; thresholds.path
    need not exist yet, calibration is what creates it."""
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "camera": {"source": {"kind": "folder", "path": str(site["ds"] / "test" / "good")}, "mode": "every"},
        "model": {"bundle": str(site["bundle"]), "backend": "onnxruntime"},
        "thresholds": {"path": str(tmp_path / "thresholds.yaml")},
        "mqtt": {"station": "line1"},
        "spool": {"path": str(tmp_path / "spool.db")},
    }))
    proc = calibrate("capture", "--config", config, "--frames", 25, "--out", tmp_path / "cap")
    assert proc.returncode == 0, proc.stderr
    meta = yaml.safe_load((tmp_path / "cap" / "capture.yaml").read_text())
    assert meta["n_frames"] == 25 and meta["source"]["kind"] == "camera" and meta["backend"] == "onnxruntime"
    assert meta["source"]["camera"] == "cam0"


def test_corrupt_images_are_skipped_and_counted(site, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((site["ds"] / "test" / "good").glob("*.png"))[:22]:
        (images / src.name).write_bytes(src.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (images / "empty.jpg").write_bytes(b"")
    proc = calibrate("capture", "--images", images, "--bundle", site["bundle"], "--out", tmp_path / "cap")
    assert proc.returncode == 0, proc.stderr
    assert "broken.png" in proc.stderr and "empty.jpg" in proc.stderr and "Traceback" not in proc.stderr
    meta = yaml.safe_load((tmp_path / "cap" / "capture.yaml").read_text())
    assert meta["n_frames"] == 22 and meta["skipped"]["count"] == 2


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_template_bundle(tmp_path_factory.mktemp("other_bundle"), size=64, seed=1).root)


def test_bad_inputs_are_refused_with_one_clear_line(site, other_bundle, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # capture: an empty folder, a missing folder, --images without --bundle, a folder that already holds a capture
    assert_refused(calibrate("capture", "--images", empty, "--bundle", site["bundle"], "--out", tmp_path / "c1"),
                   str(empty), "no images")
    assert_refused(calibrate("capture", "--images", tmp_path / "nope", "--bundle", site["bundle"], "--out", tmp_path / "c2"),
                   str(tmp_path / "nope"), "not found")
    assert_refused(calibrate("capture", "--images", site["ds"] / "test" / "good", "--out", tmp_path / "c3"), "--bundle")
    assert_refused(calibrate("capture", "--images", site["ds"] / "test" / "good", "--bundle", site["bundle"],
                             "--out", site["cap"]), str(site["cap"]), "--force")
    # fit: not a capture, a capture made with another bundle, a defects folder in the wrong layout
    assert_refused(calibrate("fit", empty, "--false-alarm-rate", "0.01"), str(empty / "capture.yaml"))
    assert_refused(calibrate("fit", site["cap"], "--false-alarm-rate", "0.01", "--bundle", other_bundle),
                   str(site["cap"] / "capture.yaml"), "another model")
    assert_refused(calibrate("fit", site["cap"], "--false-alarm-rate", "0.01", "--defects", empty, "--no-report"),
                   str(empty / "test"), "MVTec")
    assert_refused(calibrate("fit", site["cap"], "--false-alarm-rate", "0.01", "--strategy", "best_f1", "--no-report"),
                   "--defects")
    # argparse: a rate that is not one (usage error, status 2)
    assert_refused(calibrate("fit", site["cap"], "--false-alarm-rate", "5"), "--false-alarm-rate", code=2)


def test_too_few_frames_and_thresholds_of_another_bundle_are_refused(site, fitted, other_bundle, tmp_path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for src in sorted((site["ds"] / "test" / "good").glob("*.png"))[:12]:
        (few / src.name).write_bytes(src.read_bytes())
    proc = calibrate("capture", "--images", few, "--bundle", site["bundle"], "--out", tmp_path / "cap")
    assert proc.returncode == 0 and "daad-calibrate: warning: 12 frames are fewer than the 20" in proc.stderr
    assert_refused(calibrate("fit", tmp_path / "cap", "--false-alarm-rate", "0.05"), str(tmp_path / "cap"),
                   "only 12 good frames", "at least 20")
    # thresholds fitted for the template bundle, checked against another one
    assert_refused(calibrate("check", fitted, "--bundle", other_bundle, "--images", few),
                   str(fitted), "bundle_sha256", "another model")
    assert load_thresholds(fitted, load_bundle(site["bundle"])).n_frames == N_GOOD
