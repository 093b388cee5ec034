#!/usr/bin/env python3
"""The agent against the bare backend, on the same bundle and frames; prints a table, writes JSON.

    python benchmarks/bench_agent.py                                   # template bundle, 60 s full-rate run
    python benchmarks/bench_agent.py --duration 600                    # the issue's 10-minute memory run
    python benchmarks/bench_agent.py --bundle /var/lib/daad-inspect/bundle --thresholds thresholds.yaml
    python benchmarks/bench_agent.py --bundle BUNDLE --frames-from ../shared/datasets/magnetic_tile --defect-rate 0.25

Frames are synthetic parts, or with --frames-from real images of an MVTec-layout dataset: test/good and
the defect folders mixed at --defect-rate, at their own sizes (the agent stretches them like any camera
frame); thresholds then default to just above the bundle's scores of 32 of its train/good images.

Phases (frames are decoded once and served from memory, so the camera is not what is measured):
  1. bare:   preprocess + backend.infer in a loop, one thread, before and after the agent runs;
             the faster of the two is the ceiling (the CPU may be shared)
  2. full:   the whole agent (capture thread, mode every, regions, verdicts, durable spool, MQTT to a
             real Mosquitto when one is installed) at full rate for --duration seconds: throughput
             vs bare (goal >= 90 %), grab->publish latency, resident memory (VmRSS) sampled each second
  3. paced:  the agent in mode latest behind a camera at --camera-fps: latency at camera rate, drops
Latency is from the frame's grab to the end of its processing (event spooled and handed to MQTT);
in mode every at full rate it includes the time a frame waits in the queue.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.app import App  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.sdnotify import SystemdNotifier  # noqa: E402
from benchmarks.protocol import write_results  # noqa: E402
from camera.sources import Frame, FrameSource  # noqa: E402
from engine.backend import open_backend  # noqa: E402
from engine.bundle import Bundle, load_bundle  # noqa: E402
from engine.preprocess import preprocess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GOAL_RATIO = 0.90
N_FRAMES = 64  # distinct frames served in a cycle


def rss_mb() -> float:
    """Resident memory of this process from /proc (psutil is not a dependency)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class MemorySource(FrameSource):
    """Frames from memory, in a cycle, until `limit` frames or `seconds`; optionally paced at `fps`."""

    def __init__(self, frames: List[np.ndarray], limit: Optional[int] = None, seconds: Optional[float] = None,
                 fps: Optional[float] = None) -> None:
        super().__init__("memory")
        self.frames = frames
        self.limit = limit
        self.seconds = seconds
        self.period = 1.0 / fps if fps else 0.0
        self.served = 0
        self._t0 = 0.0
        self._next = 0.0

    def open(self) -> None:
        self._t0 = self._next = time.monotonic()

    def read(self) -> Optional[Frame]:
        now = time.monotonic()
        if (self.limit is not None and self.served >= self.limit) or (self.seconds is not None and now - self._t0 >= self.seconds):
            self.ended = True
            return None
        if self.period:
            if self._next > now:
                time.sleep(self._next - now)
            self._next = max(self._next, now) + self.period
        image = self.frames[self.served % len(self.frames)]
        self.served += 1
        return self._stamp(image, "memory")

    def close(self) -> None:
        pass


def make_frames(size: tuple, defect_rate: float, seed: int = 0) -> List[np.ndarray]:
    import cv2

    from train.synthetic import make_defective, make_good

    n_defective = int(round(N_FRAMES * defect_rate))
    frames = []
    for i in range(N_FRAMES):
        part = make_defective(seed, 5000 + i, 128, kind="pit")[0] if i < n_defective else make_good(seed, 100 + i, 128)
        frames.append(cv2.cvtColor(cv2.resize(part, size), cv2.COLOR_GRAY2BGR))
    rng = np.random.default_rng(seed)
    rng.shuffle(frames)
    return frames


def dataset_frames(root: Path, defect_rate: float, seed: int = 0) -> Tuple[List[np.ndarray], List[bool], List[np.ndarray]]:
    """N_FRAMES real images (OpenCV layout, own sizes) from test/: good ones and, at `defect_rate`, defective
    ones, with their labels (True: defective); and 32 other good test images to set the thresholds on (a
    training image may sit in the memory)."""
    from engine.preprocess import list_images, read_image

    rng = np.random.default_rng(seed)
    good = [Path(p) for p in rng.permutation(list_images(root / "test" / "good"))]
    defective = [p for d in sorted((root / "test").iterdir()) if d.is_dir() and d.name != "good" for p in list_images(d)]
    n_defective = int(round(N_FRAMES * defect_rate))
    n_good = N_FRAMES - n_defective
    picked = [(Path(p), True) for p in rng.choice(defective, n_defective, replace=False)] + [(p, False) for p in good[:n_good]]
    order = rng.permutation(len(picked))
    picked = [picked[i] for i in order]
    return ([read_image(p) for p, _ in picked], [label for _, label in picked],
            [read_image(p) for p in good[n_good:n_good + 32]])


def synthetic_good(size: tuple) -> List[np.ndarray]:
    import cv2

    from train.synthetic import make_good

    return [cv2.resize(make_good(0, 100 + i, 128), size) for i in range(32)]


DATASET_GOOD_QUANTILE = 0.9  # real good parts have outliers: above the largest of 32, no real defect scores


def make_thresholds(bundle: Bundle, backend: Any, work: Path, good: List[np.ndarray], quantile: Optional[float]) -> Path:
    """Just above the bundle's scores of good frames as in the tests, or at their `quantile` (about that share of
    good frames pass) so that real defects produce events; a site passes its calibrated --thresholds instead."""
    from engine.thresholds import Thresholds, save_thresholds

    outs = [backend.infer(preprocess(frame, bundle.preprocess)[None]) for frame in good]
    scores = np.array([float(o.score[0]) for o in outs])
    pixels = np.concatenate([o.anomaly_map.ravel() for o in outs])
    image = float(scores.max() * 1.05) if quantile is None else float(np.quantile(scores, quantile))
    path = work / "thresholds.yaml"
    save_thresholds(path, Thresholds(image, float(np.quantile(pixels, 0.999)), 4, bundle.sha256, strategy="manual"))
    return path


def defective_flags(bundle: Bundle, backend: Any, frames: List[np.ndarray], thresholds: Path) -> List[bool]:
    """Each frame's verdict from the bare backend (score above the image threshold): what the agent must publish."""
    from engine.thresholds import load_thresholds

    limit = load_thresholds(thresholds, bundle).image_threshold
    return [float(backend.infer(preprocess(f, bundle.preprocess)[None]).score[0]) > limit for f in frames]


def bare(bundle: Bundle, backend: Any, frames: List[np.ndarray], seconds: float) -> Dict[str, Any]:
    spec = bundle.preprocess
    for f in frames[:8]:  # warm up
        backend.infer(preprocess(f, spec)[None])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.infer(preprocess(frames[n % len(frames)], spec)[None])
        n += 1
    elapsed = time.perf_counter() - t0
    return {"frames": n, "seconds": elapsed, "fps": n / elapsed}


def agent_config(bundle: Bundle, thresholds: Path, work: Path, port: int, mode: str, backend: str) -> AgentConfig:
    return AgentConfig.model_validate({
        "camera": {"name": "bench", "source": {"kind": "folder", "path": str(work)}, "mode": mode, "queue_size": 8},
        "model": {"bundle": str(bundle.root), "backend": backend},
        "thresholds": {"path": str(thresholds), "poll_s": 2},
        "mqtt": {"host": "127.0.0.1", "port": port, "station": "bench", "status_interval_s": 1,
                 "reconnect_min_s": 0.5, "reconnect_max_s": 2},
        "spool": {"path": str(work / f"spool-{mode}.db"), "max_events": 100000},
    })


def run_agent(config: AgentConfig, source: MemorySource, backend: Any, sample_rss: bool) -> Dict[str, Any]:
    app = App(config, camera=source, backend=backend, notifier=SystemdNotifier(environ={}))
    samples: List[tuple] = []
    done = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not done.wait(1.0):
            samples.append((time.monotonic() - t0, rss_mb(), app.frames_scored))

    thread = threading.Thread(target=sampler, daemon=True)
    first: Dict[str, float] = {}
    original = app.process

    def timed(frame: Frame) -> None:  # time from the first scored frame, not from start-up
        original(frame)
        first.setdefault("t", time.perf_counter())

    app.process = timed  # type: ignore[assignment]
    if sample_rss:
        thread.start()
    app.init()
    app.start()
    app.loop()
    t_end = time.perf_counter()
    lat = app.latency_ms()
    latencies = app.recent_latencies_s() * 1e3
    stats = app.publisher.stats()
    scored, defects, dropped = app.frames_scored, app.defects, app.capture.dropped
    app.stop()
    done.set()
    elapsed = t_end - first.get("t", t_end)
    out: Dict[str, Any] = {
        "frames": scored, "defects": defects, "dropped": dropped, "seconds": elapsed,
        "fps": (scored - 1) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {"p50": lat["p50"], "p99": lat["p99"],
                       "max": float(latencies.max()) if latencies.size else None},
        "mqtt": {k: stats.get(k) for k in ("connected", "published", "acked", "spool_depth", "spool_dropped")},
    }
    if samples:
        warm = [s for s in samples if s[0] >= min(10.0, samples[-1][0] / 5)] or samples
        t = np.array([s[0] for s in warm])
        r = np.array([s[1] for s in warm])
        slope = float(np.polyfit(t, r, 1)[0] * 60) if len(warm) >= 2 else 0.0
        out["rss_mb"] = {"after_warmup": float(r[0]), "end": float(r[-1]), "max": float(max(s[1] for s in samples)),
                         "growth_mb_per_min": slope, "samples": [[round(a, 1), round(b, 1), c] for a, b, c in samples]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the template test bundle, built here)")
    parser.add_argument("--thresholds", type=Path, help="thresholds.yaml for --bundle (default: computed)")
    parser.add_argument("--backend", default="onnxruntime", choices=("auto", "onnxruntime", "tensorrt"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the full-rate run (600 for the issue)")
    # each bare window: 5 s let a shared CPU's bursts set the ceiling (bare 12.3-15.4 fps for one bundle in
    # three runs, where 20 s windows agreed at 12.3-12.9); the ratio's denominator needs a steadier figure
    parser.add_argument("--bare-seconds", type=float, default=20.0)
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--camera-fps", type=float, default=30.0)
    parser.add_argument("--frame-size", default="640x480", help="WxH of the frames fed to the agent")
    parser.add_argument("--defect-rate", type=float, default=0.02, help="share of defective frames (each is spooled)")
    parser.add_argument("--frames-from", type=Path, help="MVTec-layout dataset: serve its test images instead of synthetic parts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = tuple(int(v) for v in args.frame_size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    if args.bundle is None:
        from tests.bundle_factory import make_template_bundle

        bundle = make_template_bundle(work / "bundle", size=64)
    else:
        bundle = load_bundle(args.bundle)
    backend = open_backend(bundle, prefer=args.backend)
    if args.frames_from is not None:
        frames, labels, good = dataset_frames(args.frames_from, args.defect_rate)
    else:
        frames, labels, good = make_frames(size, args.defect_rate), None, synthetic_good(size)
    quantile = DATASET_GOOD_QUANTILE if args.frames_from is not None else None
    thresholds = args.thresholds or make_thresholds(bundle, backend, work, good, quantile)

    broker = None
    try:
        from tests.mqtt_broker import MosquittoBroker, find_mosquitto, free_port

        port = free_port()
        if find_mosquitto():
            broker = MosquittoBroker(work / "mosquitto", port=port).start()
    except Exception as exc:  # no broker: events stay in the spool, which is still written
        print(f"(no Mosquitto: {exc}; events only spooled)")
    results: Dict[str, Any] = {
        "bundle": bundle.name, "bundle_sha256": bundle.sha256, "backend": type(backend).__name__,
        "frame_size": list(size) if args.frames_from is None else "dataset's own",
        "frames_from": str(args.frames_from) if args.frames_from else "synthetic",
        "defect_rate": args.defect_rate, "duration_s": args.duration,
        "thresholds": str(args.thresholds) if args.thresholds else ("synthetic good max x 1.05" if quantile is None
                                                                    else f"good test images' q{quantile:g}"),
        "broker": broker is not None, "python": platform.python_version(), "machine": platform.machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        rss0 = rss_mb()
        before = bare(bundle, backend, frames, args.bare_seconds)
        results["full"] = run_agent(agent_config(bundle, thresholds, work, port, "every", args.backend),
                                    MemorySource(frames, seconds=args.duration), backend, sample_rss=True)
        results["paced"] = run_agent(agent_config(bundle, thresholds, work, port, "latest", args.backend),
                                     MemorySource(frames, seconds=args.paced_seconds, fps=args.camera_fps), backend,
                                     sample_rss=False)
        after = bare(bundle, backend, frames, args.bare_seconds)
        # the CPU may be shared: bare runs before and after the agent, the faster one is the ceiling
        results["bare"] = max(before, after, key=lambda r: r["fps"])
        results["bare_runs_fps"] = [before["fps"], after["fps"]]
        results["rss_mb_before"] = rss0
    finally:
        if broker is not None:
            broker.stop()
    # mode every drops nothing and serves the frames in order: the events it must have published
    flags = defective_flags(bundle, backend, frames, thresholds)
    results["full"]["expected_events"] = sum(flags[i % len(frames)] for i in range(results["full"]["frames"]))
    results["flagged_frames_per_cycle"] = f"{sum(flags)} of {len(frames)}"
    if labels is not None:
        n_bad = sum(labels)
        results["flagged_by_label"] = {
            "defective": f"{sum(f for f, bad in zip(flags, labels) if bad)} of {n_bad}",
            "good": f"{sum(f for f, bad in zip(flags, labels) if not bad)} of {len(labels) - n_bad}"}
    ratio = results["full"]["fps"] / results["bare"]["fps"]
    results["throughput_ratio"] = ratio
    results["goal_met"] = ratio >= GOAL_RATIO

    full, paced, rss = results["full"], results["paced"], results["full"].get("rss_mb", {})
    rows = [
        ("bare backend (preprocess+infer)", f"{results['bare']['fps']:.0f} fps (best of 2)", "", ""),
        ("agent, full rate, mode every", f"{full['fps']:.0f} fps ({ratio:.0%} of bare)",
         f"{full['latency_ms']['p50']:.2f} / {full['latency_ms']['p99']:.2f}", f"{full['dropped']}"),
        (f"agent, camera {args.camera_fps:g} fps, mode latest", f"{paced['fps']:.1f} fps",
         f"{paced['latency_ms']['p50']:.2f} / {paced['latency_ms']['p99']:.2f}", f"{paced['dropped']}"),
    ]
    source = f"frames {size[0]}x{size[1]} synthetic" if args.frames_from is None else f"frames from {args.frames_from}"
    print(f"\nbench_agent: {bundle.name} ({bundle.sha256[:12]}), {results['backend']}, {source}, "
          f"{args.defect_rate:.0%} defective, broker {'mosquitto' if broker else 'none'}")
    print(f"{'run':40} {'throughput':26} {'latency p50/p99 ms':20} dropped")
    for row in rows:
        print(f"{row[0]:40} {row[1]:26} {row[2]:20} {row[3]}")
    if rss:
        print(f"memory over {full['seconds']:.0f}s at full rate: VmRSS {rss['after_warmup']:.1f} -> {rss['end']:.1f} MB "
              f"(max {rss['max']:.1f}), growth {rss['growth_mb_per_min']:+.2f} MB/min; "
              f"events {full['defects']} of {full['expected_events']} expected (acked {full['mqtt']['acked']}, "
              f"spool {full['mqtt']['spool_depth']}); {results['flagged_frames_per_cycle']} distinct frames flagged")
    if "flagged_by_label" in results:
        print(f"distinct frames flagged: defective {results['flagged_by_label']['defective']}, "
              f"good {results['flagged_by_label']['good']} (thresholds: {results['thresholds']})")
    print(f"goal >= {GOAL_RATIO:.0%} of bare: {'met' if results['goal_met'] else 'NOT met'}")
    write_results(args.out, "bench_agent-", results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
