#!/usr/bin/env python3
"""The end-to-end demo, on a laptop with no GPU and no Jetson (about a minute on 2 CPU cores):

  fit -> evaluate -> export the bundle -> calibrate thresholds on good parts seen through the camera ->
  start a local broker -> run the agent on a video of good and defective parts ->
  show the defect events a subscriber received, and where the pictures are.

    python scripts/demo.py                         # generated parts
    python scripts/demo.py --data ../shared/datasets/magnetic_tile   # real images (MVTec layout)
    python scripts/demo.py --quick                 # a shortened run (the test suite uses it)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from engine.errors import DaadError  # noqa: E402
from engine.preprocess import list_images, read_image  # noqa: E402

STATION = "demo"
VIDEO_FPS = 10
VIDEO_SIZE = (256, 256)  # (w, h) of the demo camera's frames
N_STEPS = 8


def step(n: int, text: str) -> None:
    print(f"\n[{n}/{N_STEPS}] {text}", flush=True)


TOOLS = {"train": "daad-train", "engine": "daad-engine", "calibration": "daad-calibrate"}  # module -> console script


def run_cli(module: str, *args: str) -> None:
    """Run one of our console scripts as a user would (python -m keeps it independent of PATH)."""
    command = f"{TOOLS.get(module, module)} {' '.join(args)}"
    print(f"next: {command}", flush=True)  # the exact command, as a user would type it
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: error: `{command}` failed with exit code {proc.returncode}")


def write_video(path: Path, frames: List[np.ndarray]) -> Path:
    """An MJPG clip at the camera's size: frames pass the same resize and compression as a camera's would."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    for image in frames:
        frame = cv2.resize(image, VIDEO_SIZE, interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR) if frame.ndim == 2 else frame)
    writer.release()
    return path


def make_video(path: Path, data: Path, synthetic: bool, n_frames: int, seed: int) -> List[int]:
    """A clip of parts passing the camera; returns the frame numbers that show a defect."""
    from train.synthetic import make_defective, make_good

    rng = np.random.default_rng(seed)
    real_good = real_bad = []
    if not synthetic:
        real_good = list_images(data / "test" / "good")
        real_bad = sorted(p for d in (data / "test").iterdir() if d.is_dir() and d.name != "good" for p in list_images(d))
    frames, defective_frames = [], []
    for i in range(n_frames):
        bad = i % 4 == 3  # every fourth part is defective
        if synthetic:
            image = make_defective(seed, 300_000 + i)[0] if bad else make_good(seed, 200_000 + i)
        else:
            pool = real_bad if bad else real_good
            image = read_image(pool[int(rng.integers(len(pool)))])
        frames.append(image)
        if bad:
            defective_frames.append(i)
    write_video(path, frames)
    return defective_frames


def agent_config(out: Path, video: Path, bundle: Path, thresholds: Path, host: str = "127.0.0.1",
                 port: int = 1883) -> Path:
    """The agent's config with the camera on a video file; calibration captures through the same camera."""
    config = out / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "camera": {"name": "cam0", "source": {"kind": "video", "path": str(video), "loop": False, "realtime": False},
                   "mode": "every"},
        "model": {"bundle": str(bundle), "backend": "auto"},
        "thresholds": {"path": str(thresholds)},
        "mqtt": {"host": host, "port": port, "station": STATION, "status_interval_s": 1},
        "spool": {"path": str(out / "state" / "spool.db")},
        "frames": {"dir": str(out / "defect-frames")},
    }, sort_keys=False))
    return config


class EventCollector:
    """A real MQTT subscriber, as a PLC or dashboard would be."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.events: List[Dict[str, Any]] = []
        self.status: Dict[str, Any] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-subscriber")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe(f"daad/{STATION}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        payload = msg.payload.decode()
        with self.lock:
            if msg.topic.endswith("/defects"):
                self.events.append(json.loads(payload))
            elif msg.topic.endswith("/status"):
                self.status = json.loads(payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="MVTec-layout dataset (default: generate synthetic parts)")
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--model", default="inspect", help="`inspect` (the product's default: nothing trained) or a "
                        "trained preset such as daad_plus")
    parser.add_argument("--steps", type=int, help="training steps of a trained preset (default: the preset's own)")
    parser.add_argument("--size", type=int, help="model input size (default: the model's own, 256 for inspect)")
    parser.add_argument("--frames", type=int, default=40, help="frames in the demo video")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto")
    parser.add_argument("--false-alarm-rate", default="2%")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (for the test suite)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:  # a smaller input and video for the test suite
        args.size, args.frames = args.size or 128, 16
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    synthetic = not args.data
    data = Path(args.data).resolve() if args.data else out / "dataset"
    t_start = time.monotonic()
    try:
        step(1, "dataset: " + (f"{data}" if args.data else f"generating synthetic parts in {data}"))
        held_back = out / "calibration_good"
        held_back.mkdir()
        if synthetic:
            from train.synthetic import make_good, write_synthetic_dataset

            n_train = 40 if args.quick else 120
            write_synthetic_dataset(data, n_train=n_train, n_test_good=20, n_test_per_defect=5, size=128, seed=args.seed)
            for i in range(40 if args.quick else 100):  # good parts never seen in training, as on the line
                cv2.imwrite(str(held_back / f"{i:03d}.png"), make_good(args.seed, 400_000 + i))
        else:
            goods = list_images(data / "test" / "good")
            for p in goods[: len(goods) // 2]:  # the other half stays in the evaluation set's role
                shutil.copy(p, held_back / p.name)

        at = f" at {args.size}px" if args.size else ""
        step(2, f"training {args.model} for {args.steps} steps{at}" if args.steps else
             f"fitting {args.model}{at} (features of the good images into its memories)")
        run = out / "run"
        fit_args = ["--data", str(data), "--model", args.model, "--out", str(run), "--seed", str(args.seed)]
        fit_args += ["--size", str(args.size)] if args.size else []
        fit_args += ["--steps", str(args.steps), "--batch-size", "8", "--lr", "1e-3"] if args.steps else []
        run_cli("train", "fit", *fit_args)

        step(3, "evaluating on the labelled test set (metrics, plots and report.html)")
        run_cli("train", "eval", "--checkpoint", str(run / "last.pt"), "--data", str(data), "--out", str(out / "eval"))

        step(4, "exporting the bundle (ONNX + bundle.yaml), checking parity with PyTorch and TensorRT compatibility")
        bundle = out / "bundle"
        run_cli("train", "export", "--checkpoint", str(run / "last.pt"), "--out", str(bundle),
                "--metrics", str(out / "eval" / "metrics.json"), "--parity-images", str(held_back))
        run_cli("engine", "check", str(bundle))

        cal = out / "calibration"
        good_frames = [read_image(p) for p in list_images(held_back)]
        step(5, f"calibrating thresholds on {len(good_frames)} frames of good parts from the camera (a video of "
                f"held-back good parts; target false-alarm rate {args.false_alarm_rate})")
        config = agent_config(out, write_video(out / "calibration.avi", good_frames), bundle, cal / "thresholds.yaml")
        run_cli("calibration", "capture", "--config", str(config), "--frames", str(len(good_frames)), "--interval", "0",
                "--out", str(cal))
        run_cli("calibration", "fit", str(cal), "--false-alarm-rate", args.false_alarm_rate, "--bundle", str(bundle),
                "--out", str(cal / "thresholds.yaml"), "--report", str(cal / "report"))

        step(6, "starting a local MQTT broker")
        from scripts.local_broker import start_local_broker

        broker = start_local_broker(out, None if args.broker == "auto" else args.broker)
        print(f"broker: {broker.kind} on {broker.host}:{broker.port}")
        try:
            collector = EventCollector(broker.host, broker.port)
            step(7, f"running the agent on a {args.frames}-frame video of parts (every 4th is defective)")
            video = out / "line.avi"
            defective_frames = make_video(video, data, synthetic, args.frames, args.seed)
            config = agent_config(out, video, bundle, cal / "thresholds.yaml", broker.host, broker.port)
            print(f"next: daad-agent --config {config}", flush=True)
            agent = subprocess.run([sys.executable, "-m", "agent", "--config", str(config)], cwd=ROOT)
            if agent.returncode != 0:
                raise SystemExit(f"demo: the agent exited with {agent.returncode}")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(collector.events) < 1:
                time.sleep(0.1)
            time.sleep(1.0)  # the last acknowledged events reach the subscriber
            collector.close()
        finally:
            broker.stop()

        step(8, "what the subscriber received")
        events = sorted(collector.events, key=lambda e: e["seq"])
        flagged = {e["seq"] for e in events}
        caught = sorted(flagged & set(defective_frames))
        false_alarms = sorted(flagged - set(defective_frames))
        for e in events:
            regions = ", ".join(f"bbox {r['bbox']} area {r['area']}" for r in e["regions"][:3]) or (
                "image score above the threshold, no region above the pixel threshold")
            truth = "defective part" if e["seq"] in defective_frames else "GOOD part (false alarm)"
            print(f"  frame {e['seq']:3d}  score {e['image_score']:.3f} > {e['image_threshold']:.3f}  [{truth}]  {regions}")
        summary = {"events": len(events), "defective_frames": len(defective_frames), "caught": len(caught),
                   "missed": len(defective_frames) - len(caught), "false_alarms": len(false_alarms),
                   "seconds": round(time.monotonic() - t_start, 1)}
        (out / "summary.json").write_text(json.dumps({**summary, "events_received": events}, indent=2))
        print(f"\n{summary['events']} defect events received: {summary['caught']} of {summary['defective_frames']} "
              f"defective parts caught, {summary['false_alarms']} false alarms, in {summary['seconds']} s.")
        print("Where to look:")
        print(f"  evaluation report  {out / 'eval' / 'report.html'} (metrics, per-type table, plots)")
        print(f"  calibration report {cal / 'report' / 'report.html'}")
        print(f"  defective frames   {out / 'defect-frames'}/")
        print(f"  bundle             {bundle}/ (model.onnx, bundle.yaml)")
        print(f"  events             {out / 'summary.json'}")
        return 0
    except DaadError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
