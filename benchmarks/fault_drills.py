#!/usr/bin/env python3
"""Fault drills: daad-agent as a process against a real Mosquitto, through the faults of issue 36.

    python benchmarks/fault_drills.py                 # the issue's durations (broker down 60 s, ...), ~4 min
    python benchmarks/fault_drills.py --quick         # the same drills with short faults, ~1.5 min
    python benchmarks/fault_drills.py --only broker-down,sigkill --broker-down-s 120

A folder camera (watched) receives synthetic parts at --fps, every --defect-every-th one a pit that
the template bundle flags, so the agent produces a steady stream of events. A persistent subscriber
(its session kept by the broker across restarts) records what arrives. For each drill:

  produced    distinct events the agent logged as published (`defect:` lines), together with any that
              arrived without their line (spooled just before a SIGKILL, the line not yet written)
  delivered   distinct event ids the subscriber received
  lost        produced and never delivered
  duplicates  deliveries of an event id already received (QoS 1 is at-least-once; consumers de-duplicate)
  recover_s   from the end of the fault to the moment every event produced until then was delivered
              (camera: to the first frame streamed again)

Drills: broker down; SIGKILL x3 (the folder is emptied before each restart, so old frames are not
scored again); camera gone and back (the folder renamed away); disk full (the spool on a small tmpfs
filled to the last byte: needs root) with the broker up, and once more with the broker down and a
SIGKILL inside the window, which measures what a restart then loses; a wrong TLS CA and a wrong
password, each fixed by restarting the agent with the right setting. The agent runs with the
product's reconnect and reopen defaults. Prints a table and writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402

from benchmarks.protocol import write_results  # noqa: E402
from tests.full_disk import TinyDisk  # noqa: E402
from tests.mqtt_broker import MosquittoBroker, broker_store, find_mosquitto, wait_for  # noqa: E402
from tests.tls_pki import OPENSSL, Pki, make_pki  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STATION = "drill"
N_PARTS = 16  # distinct good and defective images, written in a cycle
AGENT_READY_S = 60.0  # bundle load and ONNX Runtime start on a shared CPU
SETTLE_S = 45.0  # after the last frame, how long delivery may take (reconnect backoff up to 30 s)
POLL_S = 0.05
# the durations, and --quick's
DEFAULTS = {"broker_down_s": 60.0, "camera_gone_s": 20.0, "disk_full_s": 20.0, "run_s": 5.0, "kill_every_s": 4.0}
QUICK = {"broker_down_s": 5.0, "camera_gone_s": 3.0, "disk_full_s": 4.0, "run_s": 2.0, "kill_every_s": 2.0}
DRILLS = ("broker-down", "sigkill", "camera", "disk-full", "disk-full-kill", "disk-full-kill-no-reserve", "tls-ca",
          "password")


# -- parts ---------------------------------------------------------------------------------------
def make_parts(folder: Path) -> List[Path]:
    """PNG files to copy into the camera folder: good parts, and pits (always flagged)."""
    import cv2

    from train.synthetic import make_defective, make_good

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(N_PARTS):
        for name, image in ((f"good{i:02d}.png", make_good(0, 100 + i, 128)),
                            (f"pit{i:02d}.png", make_defective(0, 5000 + i, 128, kind="pit")[0])):
            cv2.imwrite(str(folder / name), image)
            files.append(folder / name)
    return files


def make_bundle_and_thresholds(work: Path) -> Dict[str, Path]:
    import numpy as np

    from engine.thresholds import Thresholds, save_thresholds
    from engine.onnxruntime_backend import OnnxRuntimeBackend
    from engine.preprocess import preprocess, read_image
    from tests.bundle_factory import make_template_bundle

    bundle = make_template_bundle(work / "bundle", size=64)
    backend = OnnxRuntimeBackend(bundle)
    parts = make_parts(work / "parts")
    scores = {p.name: float(backend.infer(preprocess(read_image(p), bundle.preprocess)[None]).score[0]) for p in parts}
    good = [s for n, s in scores.items() if n.startswith("good")]
    pits = [s for n, s in scores.items() if n.startswith("pit")]
    threshold = max(good) * 1.05
    if min(pits) <= threshold:
        raise SystemExit("drill setup: the pits no longer stand out from the good parts")
    maps = np.concatenate([backend.infer(preprocess(read_image(p), bundle.preprocess)[None]).anomaly_map.ravel()
                           for p in parts if p.name.startswith("good")])
    path = work / "thresholds.yaml"
    save_thresholds(path, Thresholds(threshold, float(np.quantile(maps, 0.999)), 4, bundle.sha256, strategy="manual"))
    return {"bundle": bundle.root, "thresholds": path, "parts": work / "parts"}


class Feeder:
    """Copies parts into the camera folder at `fps` (hidden name, then an atomic rename, as a camera should)."""

    def __init__(self, parts: Path, folder: Path, fps: float, defect_every: int) -> None:
        self.goods = sorted(parts.glob("good*.png"))
        self.pits = sorted(parts.glob("pit*.png"))
        self.folder = folder
        self.period = 1.0 / fps
        self.defect_every = defect_every
        self.written = 0
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Feeder":
        self._thread.start()
        return self

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            due += self.period
            self._stop.wait(max(0.0, due - time.monotonic()))
            if self._paused.is_set() or not self.folder.is_dir():
                continue
            n = self.written
            source = self.pits if n % self.defect_every == 0 else self.goods
            src = source[(n // self.defect_every) % len(source)]
            tmp = self.folder / f".{n:07d}.tmp"
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, self.folder / f"{n:07d}.png")
            except OSError:
                continue  # the folder was renamed away between the check and the copy
            self.written += 1


# -- the agent as a process ------------------------------------------------------------------------
class Agent:
    """`python -m agent --config FILE --log-json`; its JSON log lines collected as they come."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config), "--log-json"],
                                     cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # OpenCV's own warnings
            record["t"] = time.monotonic()
            with self._lock:
                self.lines.append(record)

    def logged(self, text: str, level: Optional[str] = None) -> List[Dict[str, Any]]:
        with self._lock:
            return [r for r in self.lines if text in r["msg"] and (level is None or r["level"] == level)]

    def events(self) -> Set[str]:
        return {r["event_id"] for r in self.logged("defect:") if "event_id" in r}

    def wait_log(self, text: str, timeout: float = AGENT_READY_S) -> Dict[str, Any]:
        settled = wait_for(lambda: bool(self.logged(text)) or self.proc.poll() is not None, timeout, POLL_S)
        if not settled or not self.logged(text):
            raise RuntimeError(f"the agent never logged {text!r} (exit {self.proc.poll()})")
        return self.logged(text)[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def term(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        self._reader.join(5)
        return rc


class Consumer:
    """A persistent paho subscriber on <prefix>/<station>/defects, counting every delivery."""

    def __init__(self, port: int, ca: Optional[Path] = None, username: Optional[str] = None,
                 password: Optional[str] = None) -> None:
        self.received: List[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"drill-{uuid.uuid4().hex[:8]}",
                                  clean_session=False, protocol=mqtt.MQTTv311)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"daad/{STATION}/defects", qos=1)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect_async("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(15):
            raise RuntimeError("the drill's subscriber could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        event_id = json.loads(msg.payload)["event_id"]
        with self._lock:
            self.received.append(event_id)

    def ids(self) -> Set[str]:
        with self._lock:
            return set(self.received)

    def duplicates(self) -> int:
        with self._lock:
            return len(self.received) - len(set(self.received))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- one drill's world -------------------------------------------------------------------------------
class World:
    """A broker, a camera folder, a spool and a config, fresh for each drill."""

    def __init__(self, base: Path, name: str, assets: Dict[str, Path], args: argparse.Namespace,
                 spool_dir: Optional[Path] = None) -> None:
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.store = broker_store()
        self.broker = MosquittoBroker(self.dir / "broker").persist(self.store)
        self.folder = self.dir / "incoming"
        self.folder.mkdir()
        self.assets = assets
        self.args = args
        self.spool = (spool_dir or self.dir / "state") / "spool.db"
        self.feeder = Feeder(assets["parts"], self.folder, args.fps, args.defect_every)
        self.consumer: Optional[Consumer] = None
        self.produced: Set[str] = set()  # logged by agents that are gone (killed or stopped)
        self.agent: Optional[Agent] = None

    def config(self, spool: Optional[Dict[str, Any]] = None, **mqtt_extra: Any) -> Path:
        data = {
            "camera": {"name": "cam0", "mode": "every", "queue_size": 8,
                       "source": {"kind": "folder", "path": str(self.folder), "watch": True, "poll_s": 0.05,
                                  "settle_s": 0.05}},
            "model": {"bundle": str(self.assets["bundle"]), "backend": "onnxruntime"},
            "thresholds": {"path": str(self.assets["thresholds"])},
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port, "station": STATION, "status_interval_s": 1.0,
                     "client_id": f"daad-agent-{STATION}", **mqtt_extra},
            "spool": {"path": str(self.spool), "max_events": 100000, **(spool or {})},
        }
        path = self.dir / f"agent-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def start_agent(self, config: Path) -> Agent:
        self.agent = Agent(config)
        return self.agent

    def start_line(self, config: Path) -> Agent:
        """Every drill's opening: the broker and a consumer up, the agent started on `config`, frames coming, and
        the agent ready."""
        self.broker.start()
        self.consumer = Consumer(self.broker.port)
        agent = self.start_agent(config)
        self.feeder.start()
        agent.wait_log("agent: ready")
        return agent

    def retire_agent(self, how: str) -> None:
        """Kill (SIGKILL) or stop (SIGTERM) the running agent, keeping what it logged."""
        if self.agent is None:
            return
        self.agent.kill() if how == "kill" else self.agent.term()
        self.produced |= self.agent.events()
        self.agent = None

    def all_produced(self) -> Set[str]:
        return self.produced | (self.agent.events() if self.agent else set())

    def delivered_all(self, produced: Set[str]) -> bool:
        return self.consumer is not None and produced <= self.consumer.ids()

    def recover(self, since: float, produced: Optional[Set[str]] = None, timeout: float = SETTLE_S) -> Optional[float]:
        """Seconds from `since` until every event produced so far (or `produced`) was delivered; None: never."""
        target = self.all_produced() if produced is None else produced
        if not wait_for(lambda: self.delivered_all(target), timeout, POLL_S):
            return None
        return time.monotonic() - since

    def finish(self, name: str, recover_s: Optional[float], note: str = "") -> Dict[str, Any]:
        self.feeder.stop()
        wait_for(lambda: self.delivered_all(self.all_produced()), SETTLE_S, POLL_S)
        self.retire_agent("term")
        time.sleep(1.0)  # the last acknowledgements and deliveries
        delivered = self.consumer.ids() if self.consumer else set()
        produced = self.produced | delivered  # an event spooled just before a SIGKILL may have no log line
        return {
            "drill": name, "produced": len(produced), "delivered": len(delivered),
            "lost": len(self.produced - delivered), "duplicates": self.consumer.duplicates() if self.consumer else 0,
            "recover_s": None if recover_s is None else round(recover_s, 2), "frames_written": self.feeder.written,
            "note": note,
        }

    def close(self) -> None:
        self.feeder.stop()
        if self.agent is not None:
            self.agent.kill()
        if self.consumer is not None:
            self.consumer.close()
        self.broker.stop()
        shutil.rmtree(self.store, ignore_errors=True)


def steady(world: World, seconds: float) -> None:
    """Normal running: frames keep coming."""
    time.sleep(seconds)


# -- the drills ------------------------------------------------------------------------------------
def drill_broker_down(world: World, d: Dict[str, float]) -> Dict[str, Any]:
    world.start_line(world.config())
    steady(world, d["run_s"])
    world.broker.stop()
    time.sleep(d["broker_down_s"])
    world.broker.start()
    back = time.monotonic()
    recover = world.recover(back)
    steady(world, d["run_s"])
    return world.finish("broker down", recover, f"{d['broker_down_s']:g} s down, agent kept scoring")


def drill_sigkill(world: World, d: Dict[str, float]) -> Dict[str, Any]:
    config = world.config()
    world.start_line(config)
    recoveries = []
    for _ in range(3):
        steady(world, d["kill_every_s"])
        world.retire_agent("kill")
        world.feeder.pause()
        for f in world.folder.iterdir():  # frames not yet scored die with the process, like a camera's
            f.unlink(missing_ok=True)
        killed_with = set(world.produced)
        restarted = time.monotonic()
        world.feeder.resume()
        world.start_agent(config).wait_log("MQTT: connected")
        recover = world.recover(restarted, killed_with)
        recoveries.append(recover)
    steady(world, d["run_s"])
    worst = None if any(r is None for r in recoveries) else max(recoveries)
    return world.finish("SIGKILL x3", worst, "restart to delivery of the killed agent's spool, worst of 3")


def drill_camera(world: World, d: Dict[str, float]) -> Dict[str, Any]:
    agent = world.start_line(world.config())
    steady(world, d["run_s"])
    away = world.dir / "away"
    world.feeder.pause()
    os.rename(world.folder, away)
    time.sleep(d["camera_gone_s"])
    streams_before = len(agent.logged(": streaming"))
    os.rename(away, world.folder)
    back = time.monotonic()
    world.feeder.resume()
    ok = wait_for(lambda: len(agent.logged(": streaming")) > streams_before, SETTLE_S, POLL_S)
    recover = (agent.logged(": streaming")[-1]["t"] - back) if ok else None
    cause = agent.logged("reconnecting (", level="WARNING")
    steady(world, d["run_s"])
    said = cause[0]["msg"].replace(str(world.folder), "<folder>") if cause else "nothing"
    note = f"{d['camera_gone_s']:g} s gone; warned {len(cause)}x: {said}"
    return world.finish("camera gone and back", recover, note)


def drill_disk_full(world: World, d: Dict[str, float], disk: TinyDisk) -> Dict[str, Any]:
    """The broker up, the spool without its reserve: events go out from memory while the disk is full."""
    agent = world.start_line(world.config(spool={"reserve_mb": 0}))
    steady(world, d["run_s"])
    disk.fill()
    time.sleep(d["disk_full_s"])
    failures = len(agent.logged("kept in memory", level="ERROR"))
    disk.free()
    freed = time.monotonic()
    recover = world.recover(freed)
    steady(world, d["run_s"])
    note = f"no reserve, {d['disk_full_s']:g} s full: events sent from memory; error logged {failures}x"
    return world.finish("disk full, broker up", recover, note)


def drill_disk_full_kill(world: World, d: Dict[str, float], disk: TinyDisk, reserve: bool) -> Dict[str, Any]:
    """Disk full AND broker down, then a crash: with the spool's disk reserve (the default) the events are
    still on disk; without it (reserve_mb: 0) this measures what a restart in that window loses."""
    config = world.config(spool=None if reserve else {"reserve_mb": 0})
    agent = world.start_line(config)
    steady(world, d["run_s"])
    world.broker.stop()
    disk.fill()
    filled = time.monotonic()
    time.sleep(d["disk_full_s"])
    before = {r["event_id"] for r in agent.logged("defect:") if r["t"] < filled}
    in_window = len(agent.events() - before)
    world.retire_agent("kill")
    disk.free()
    world.broker.start()
    restarted = time.monotonic()
    world.start_agent(config)
    # with the reserve every event survived; without it, those of the window cannot come back
    recover = world.recover(restarted, set(world.produced)) if reserve else None
    steady(world, d["run_s"])
    released = len(agent.logged("released the"))
    name = "disk full + broker down + SIGKILL" + ("" if reserve else ", no reserve")
    where = (f"reserve released {released}x, so on disk" if reserve else "in memory only")
    return world.finish(name, recover, f"{d['disk_full_s']:g} s window: {in_window} event(s) produced in it, {where}")


def drill_tls_ca(world: World, d: Dict[str, float], pki: Pki) -> Dict[str, Any]:
    world.broker.tls(pki.server_cert, pki.server_key, pki.ca).start()
    world.consumer = Consumer(world.broker.port, ca=pki.ca)
    agent = world.start_agent(world.config(tls={"ca_file": str(pki.other_ca)}))
    world.feeder.start()
    agent.wait_log("agent: ready")
    steady(world, d["run_s"])
    named = agent.logged("cannot connect", level="WARNING")
    world.retire_agent("term")  # the installer fixes ca_file and restarts the service
    fixed = time.monotonic()
    world.start_agent(world.config(tls={"ca_file": str(pki.ca)}))
    recover = world.recover(fixed)
    steady(world, d["run_s"])
    reason = ",".join(sorted({r.get("reason", "?") for r in named}))
    return world.finish("wrong TLS CA, then fixed", recover, f"reason {reason} warned {len(named)}x (repeats at DEBUG)")


def drill_password(world: World, d: Dict[str, float]) -> Dict[str, Any]:
    passwd = world.store / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "right-password"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(passwd, 0o644)
    world.broker.password_file(passwd).start()
    world.consumer = Consumer(world.broker.port, username="agent", password="right-password")
    secret = world.dir / "mqtt-password"
    secret.write_text("wrong-password\n")
    config = world.config(username="agent", password_file=str(secret))
    agent = world.start_agent(config)
    world.feeder.start()
    agent.wait_log("agent: ready")
    steady(world, d["run_s"])
    named = agent.logged("cannot connect", level="WARNING")
    world.retire_agent("term")
    secret.write_text("right-password\n")
    fixed = time.monotonic()
    world.start_agent(config)
    recover = world.recover(fixed)
    steady(world, d["run_s"])
    reason = ",".join(sorted({r.get("reason", "?") for r in named}))
    return world.finish("wrong password, then fixed", recover, f"reason {reason} warned {len(named)}x")


# -- main ------------------------------------------------------------------------------------------
def run_drill(name: str, base: Path, assets: Dict[str, Path], args: argparse.Namespace, d: Dict[str, float],
              pki: Optional[Pki]) -> Dict[str, Any]:
    disk: Optional[TinyDisk] = None
    if name.startswith("disk-full"):
        disk = TinyDisk(base / f"{name}-disk", size_kb=args.disk_kb)
        why = disk.mount()
        if why is not None:
            return {"drill": name, "skipped": why}
    if name == "tls-ca" and pki is None:
        return {"drill": name, "skipped": "openssl CLI not installed"}
    if name == "password" and shutil.which("mosquitto_passwd") is None:
        return {"drill": name, "skipped": "mosquitto_passwd not installed"}
    world = World(base, name, assets, args, spool_dir=None if disk is None else disk.path)
    try:
        if name == "broker-down":
            return drill_broker_down(world, d)
        if name == "sigkill":
            return drill_sigkill(world, d)
        if name == "camera":
            return drill_camera(world, d)
        if name == "disk-full":
            return drill_disk_full(world, d, disk)  # type: ignore[arg-type]
        if name.startswith("disk-full-kill"):
            return drill_disk_full_kill(world, d, disk, reserve=name == "disk-full-kill")  # type: ignore[arg-type]
        if name == "tls-ca":
            return drill_tls_ca(world, d, pki)  # type: ignore[arg-type]
        return drill_password(world, d)
    except Exception as exc:  # one failed drill must not hide the others' figures
        return {"drill": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        world.close()
        if disk is not None:
            disk.umount()


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"\n{'drill':44} {'produced':>8} {'delivered':>9} {'lost':>5} {'dup':>4} {'recover s':>9}  note")
    for r in rows:
        if "produced" not in r:
            print(f"{r['drill']:44} {'-':>8} {'-':>9} {'-':>5} {'-':>4} {'-':>9}  {r.get('skipped') or r.get('error')}")
            continue
        rec = "-" if r["recover_s"] is None else f"{r['recover_s']:.1f}"
        print(f"{r['drill']:44} {r['produced']:>8} {r['delivered']:>9} {r['lost']:>5} {r['duplicates']:>4} "
              f"{rec:>9}  {r['note']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short faults (a few seconds each) for a smoke run")
    parser.add_argument("--only", default=",".join(DRILLS), help=f"comma-separated subset of {', '.join(DRILLS)}")
    parser.add_argument("--fps", type=float, default=20.0, help="frames written into the camera folder per second")
    parser.add_argument("--defect-every", type=int, default=2, help="every Nth frame is a pit (an event)")
    # room for SQLite's WAL (~4 MB before a checkpoint) and twice the default 16 MB reserve
    parser.add_argument("--disk-kb", type=int, default=48 * 1024, help="size of the tmpfs that holds the spool")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=float, default=None,
                            help=f"seconds (default {value:g}; --quick {QUICK[key]:g})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in DRILLS]
    if unknown:
        parser.error(f"--only: unknown drill(s) {', '.join(unknown)}; expected some of {', '.join(DRILLS)}")
    if find_mosquitto() is None:
        print("fault_drills: mosquitto not found; apt-get install mosquitto", file=sys.stderr)
        return 1
    durations = dict(QUICK if args.quick else DEFAULTS)
    for key in DEFAULTS:
        if getattr(args, key) is not None:
            durations[key] = getattr(args, key)

    base = Path(tempfile.mkdtemp(prefix="fault-drills-"))
    pki_store = base
    os.chmod(base, 0o755)
    started = time.monotonic()
    try:
        assets = make_bundle_and_thresholds(base / "assets")
        pki_store = broker_store()  # mosquitto's own user reads the broker's key there
        pki = make_pki(pki_store / "pki") if OPENSSL else None
        rows = []
        for name in chosen:
            print(f"drill {name} ...", flush=True)
            rows.append(run_drill(name, base, assets, args, durations, pki))
            print(f"  {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(pki_store, ignore_errors=True)
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "issue", "durations_s": durations, "fps": args.fps,
        "defect_every": args.defect_every, "python": platform.python_version(), "machine": platform.machine(),
        "seconds": round(time.monotonic() - started, 1), "drills": rows,
    }
    print(f"\nfault_drills ({results['mode']}: {', '.join(f'{k} {v:g}' for k, v in durations.items())}; "
          f"{args.fps:g} frames/s, 1 in {args.defect_every} an event; {results['seconds']:.0f} s)")
    print_table(rows)
    write_results(args.out, "fault_drills-", results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
