"""The composition root of daad-agent: init_* then start_* in order, reversed by stop().

    init_bundle -> init_thresholds -> init_backend -> init_frames_store -> init_publisher -> init_capture -> init_metrics
    start_publisher -> start_metrics -> start_capture -> loop() -> stop()

The scoring loop runs in the thread that called run() (the main thread under the CLI): the
backend is opened and used in that one thread, as TensorRT/pycuda need. CaptureLoop runs in its own
thread; MQTT in paho's and the publisher's; metrics in http.server's. Camera, backend, publisher,
notifier and clock are injectable, so tests drive the real loop with their own parts.
"""
from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import numpy as np

from camera import loop as cap
from camera.loop import CaptureLoop
from camera.sources import SYSTEM_CLOCK, Clock, Frame, FrameSource, open_source
from engine.backend import Backend, open_backend
from engine.bundle import Bundle, describe, load_bundle
from engine.errors import ConfigError, ImageError
from engine.scoring import FrameScorer, ScoredFrame, channel_mismatch, frame_channels, frame_size_of, judge, self_test
from engine.thresholds import Thresholds, load_thresholds
from engine.messages import pct

from .config import AgentConfig, is_loopback
from .drift import DRIFT_OFF, DRIFT_RECALIBRATE, DRIFT_WARNING, DriftMonitor, DriftReference, reference_or_reason
from .drift_state import EMPTY, DriftStateFile, binding_of
from .frames_store import FramesStore, encode_crop
from .metrics_http import MetricsServer, read_token
from .payloads import (
    CAMERA_STATES,
    STATE_DEGRADED,
    STATE_RUNNING,
    STATE_STARTING,
    STATE_STOPPING,
    defect_event,
    drift_payload,
    make_event_id,
    new_boot_id,
    status_payload,
)
from .sdnotify import SystemdNotifier
from .thresholds_watch import ThresholdsWatch

logger = logging.getLogger(__name__)

LOOP_TICK_S = 0.1  # the loop wakes at least this often without frames (signals, reloads, status, watchdog)
LATENCY_WINDOW = 2048  # recent frames behind the latency percentiles
CAPTURE_STOP_TIMEOUT_S = 2.0
PUBLISHER_STOP_TIMEOUT_S = 3.0
NO_REGION = "image score above the threshold, no region above the pixel threshold"  # why a regionless frame was flagged

# CaptureLoop states that the status schema does not name (yet) -> the nearest it does.


class App:
    def __init__(
        self,
        config: AgentConfig,
        *,
        camera: Optional[FrameSource] = None,
        backend: Optional[Backend] = None,
        publisher: Optional[Any] = None,
        clock: Optional[Clock] = None,
        notifier: Optional[SystemdNotifier] = None,
        max_frames: Optional[int] = None,
        boot_id: Optional[str] = None,
        config_file: Optional[str] = None,
    ) -> None:
        self.config = config
        self.config_file = config_file  # names the file in the ConfigErrors found at start
        self.clock = clock or SYSTEM_CLOCK
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.max_frames = max_frames
        self.boot_id = boot_id or new_boot_id()
        self._camera = camera
        self._stop_requested = threading.Event()
        self._stop_reason = ""
        self._status_due = False  # set from other threads (camera state change): a plain flag is enough
        self._started_at = self.clock.monotonic()
        self._stopped = False
        # parts, made by init_*
        self.bundle: Optional[Bundle] = None
        self.signed_by = ""  # id of the key whose signature was verified; "" when no public key is configured
        self.watch: Optional[ThresholdsWatch] = None
        self.backend: Optional[Backend] = backend
        self._own_backend = backend is None
        self.scorer: Optional[FrameScorer] = None
        self.blank: Optional[ScoredFrame] = None  # the blank frame scored at init_backend
        self.frames: Optional[FramesStore] = None
        self.spool: Optional[Any] = None
        self.publisher: Optional[Any] = publisher
        self.capture: Optional[CaptureLoop] = None
        self.metrics: Optional[MetricsServer] = None
        self._started: List[str] = []
        # counters (written by the loop thread only)
        self.frames_scored = 0
        self.defects = 0
        self.frames_failed = 0
        self.frames_channel_mismatch = 0  # scored, but with other channels than the model was trained on
        self._mismatch_warned: Set[str] = set()
        self.drift: Optional[DriftMonitor] = None  # made by init_thresholds
        self.drift_state: Optional[DriftStateFile] = None  # made by init_thresholds when drift.baseline_frames > 0
        self.drift_changes = 0  # state changes published on the drift topic
        self.drift_alarms = 0  # entries into recalibrate
        self.drift_warnings = 0  # entries into warning
        self._drift_published = DRIFT_OFF  # the state last published on the drift topic
        self.ready = False
        self.state = STATE_STARTING
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._latency_lock = threading.Lock()  # the metrics thread reads while the loop appends
        self._fps = 0.0
        self._fps_count = 0
        self._fps_since = self._started_at
        self._next_status = self._started_at

    # -- init, in order ----------------------------------------------------------------------------
    def init(self) -> "App":
        self.init_bundle()
        self.init_thresholds()
        self.init_backend()
        self.init_frames_store()
        self.init_publisher()
        self.init_capture()
        self.init_metrics()
        return self

    def init_bundle(self) -> None:
        self.bundle = load_bundle(self.config.model.bundle)
        logger.info("bundle: %s", describe(self.bundle))
        if self.config.model.public_key is not None:
            from engine.signing import verify_signature

            self.signed_by = verify_signature(self.bundle, self.config.model.public_key)
            logger.info("bundle: signature verified (key %s)", self.signed_by)

    def init_thresholds(self) -> None:
        cfg = self.config.thresholds
        thresholds = load_thresholds(cfg.path, self.bundle)
        self.watch = ThresholdsWatch(cfg.path, self.bundle, thresholds, poll_s=cfg.poll_s, monotonic=self.clock.monotonic)
        logger.info(
            "thresholds: image %.6g, pixel %.6g, min area %d (%s, %s)",
            thresholds.image_threshold, thresholds.pixel_threshold, thresholds.min_defect_area,
            thresholds.strategy, cfg.path,
        )
        d = self.config.drift
        if d.interval is not None:
            logger.warning("drift: drift.interval in the config is ignored (the drift alarm evaluates every good frame); "
                           "remove it")
        self.drift = DriftMonitor(d.window, d.alarm_per_frames, d.warning_per_frames, None, d.detect_false_alarm_ratio,
                                  baseline_frames=d.baseline_frames)
        if d.enabled and d.baseline_frames:
            self.drift_state = DriftStateFile(self.config.drift_state_file)
        self._reset_drift(thresholds)

    def _reset_drift(self, thresholds: Thresholds) -> None:
        """These thresholds' reference, with what the state file kept for them (a baseline or the pooled reference)."""
        ref, reason = self._drift_reference(thresholds)
        saved = EMPTY
        if ref is not None and self.drift_state is not None:
            saved = self.drift_state.load(binding_of(thresholds.bundle_sha256, thresholds.drift_reference))
        self.drift.reset(ref, reason, pooled=saved.pooled, baseline=saved.baseline)
        if self.drift_state is not None:
            self.drift_state.resumed(self.drift)
        if ref is not None and self.drift.collecting_baseline:
            logger.info("drift: collecting the line's first %d good frames (%d kept from %s) to pool with the "
                        "calibration's %d: the line right after calibration is taken as in control, as calibration "
                        "does; an alarm meanwhile restarts the collection", self.drift.baseline_frames,
                        len(self.drift.baseline), self.drift_state.path, ref.n_frames)
        elif saved.pooled is not None:
            logger.info("drift: reference from %s: the calibration's %d good frames pooled with %d of the line's "
                        "(calibration+line)", self.drift_state.path, ref.n_frames, saved.pooled.n_frames - ref.n_frames)
        self._log_drift_design()

    def _drift_reference(self, thresholds: Thresholds) -> Tuple[Optional[DriftReference], Optional[str]]:
        """The reference of these thresholds, or None and why (drift off), said once per thresholds file loaded."""
        d = self.config.drift
        path = self.config.thresholds.path
        if not d.enabled:
            reason = "drift.enabled is false in the config"
            logger.info("drift: monitoring off: %s", reason)
            return None, reason
        ref, reason = reference_or_reason(thresholds.drift_reference)
        if ref is None:
            logger.warning("drift: monitoring off: %s: %s", path, reason)
            return None, reason
        return ref, None

    def _log_drift_design(self) -> None:
        f = self.drift.figures()
        if f.limit is None:
            return
        logger.info("drift: monitoring on: CUSUM of good frames' normal scores, k %.3f, recalibrate above %.1f "
                    "(spurious <= 1 per %d unchanged frames, averaged over calibrations of %d good frames), warning above "
                    "%.1f (<= 1 per %d); a %gx false-alarm rate (%s -> %s) is caught after ~%.0f good frames",
                    f.k, f.limit, f.alarm_per_frames, f.reference_frames, f.warning_limit, f.warning_per_frames,
                    f.detect_false_alarm_ratio, pct(f.reference_false_alarm_rate),
                    pct(f.detect_false_alarm_ratio * f.reference_false_alarm_rate), f.expected_delay)

    def init_backend(self) -> None:
        if self.backend is None:
            m = self.config.model
            self.backend = open_backend(self.bundle, prefer=m.backend, precision=m.precision, plan_cache=m.plan_cache)
        self.scorer = FrameScorer(self.backend, self.bundle.preprocess)
        # one blank frame before the camera opens: a bundle the backend cannot run stops the start here
        self.blank = self_test(self.scorer, str(self.bundle.root))
        logger.info("backend: %s scored a blank frame: %.6g", self.backend.name, self.blank.score)

    def init_frames_store(self) -> None:
        f = self.config.frames
        if f.dir is not None:
            self.frames = FramesStore(f.dir, f.max_files, f.max_bytes, f.jpeg_quality)
            try:
                self.frames.open()
            except OSError as exc:
                raise self._config_error(
                    f"frames.dir: got '{f.dir}' ({exc.strerror or exc}), expected a folder the service can write "
                    "(e.g. under StateDirectory=)"
                ) from None

    def init_publisher(self) -> None:
        if self.publisher is not None:
            return
        from .mqtt import EventPublisher
        from .spool import Spool

        try:
            self.config.spool.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._config_error(
                f"spool.path: got '{self.config.spool.path}' ({exc.strerror or exc}), expected a file in a folder "
                "the service can write (e.g. under StateDirectory=)"
            ) from None
        self.spool = Spool(self.config.spool.path, self.config.spool.max_events,
                           reserve_bytes=int(self.config.spool.reserve_mb * 1e6))
        self.publisher = EventPublisher(self.config.mqtt, self.spool)

    def init_capture(self) -> None:
        c = self.config.camera
        source = self._camera if self._camera is not None else open_source(c, clock=self.clock)
        self.capture = CaptureLoop(
            source, mode=c.mode, queue_size=c.queue_size, stall_timeout_s=c.stall_timeout_s,
            reopen_min_s=c.reopen_min_s, reopen_max_s=c.reopen_max_s, clock=self.clock, on_state=self._on_camera_state,
        )

    def init_metrics(self) -> None:
        m = self.config.metrics
        if m.prometheus_port is not None:
            try:
                token = None if m.token_file is None else read_token(m.token_file)
            except ConfigError as exc:
                raise self._config_error(str(exc)) from None
            if token is None and not is_loopback(m.bind):
                logger.warning("metrics: /metrics on %s without a token: anyone who reaches port %d reads it; "
                               "set metrics.token_file", m.bind, m.prometheus_port)
            self.metrics = MetricsServer(m.bind, m.prometheus_port, self.snapshot, token=token)

    # -- start, in order -------------------------------------------------------------------------
    def start(self) -> "App":
        self.start_publisher()
        self.start_metrics()
        self.start_capture()
        return self

    def start_publisher(self) -> None:
        self.publisher.start()
        self._started.append("publisher")
        self.publish_status()
        self._publish_drift(initial=True)  # replaces a retained state left by an earlier run or bundle

    def start_metrics(self) -> None:
        if self.metrics is not None:
            try:
                self.metrics.start()
            except ConfigError as exc:
                raise self._config_error(str(exc)) from None
            self._started.append("metrics")

    def _config_error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.config_file}: {message}" if self.config_file else message)

    def start_capture(self) -> None:
        self.capture.start()
        self._started.append("capture")
        logger.info(
            "agent: station %s, camera %s (%s, mode %s), boot %s",
            self.config.mqtt.station, self.config.camera.name, self.capture.source.describe(),
            self.config.camera.mode, self.boot_id[:8],
        )

    # -- run ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """init, start, score until stopped or the source ended, stop; the exit code (0)."""
        try:
            self.init()
            self.start()
            return self.loop()
        finally:
            self.stop()

    def request_stop(self, why: str = "requested") -> None:
        """Safe from a signal handler and any thread."""
        if not self._stop_requested.is_set():
            self._stop_reason = why  # logged by the loop: no logging inside a signal handler
        self._stop_requested.set()

    def request_reload(self) -> None:
        if self.watch is not None:
            self.watch.request_reload()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop and drain; SIGHUP: reload thresholds. Main thread only."""
        signal.signal(signal.SIGTERM, lambda signum, _frame: self.request_stop(signal.Signals(signum).name))
        signal.signal(signal.SIGINT, lambda signum, _frame: self.request_stop(signal.Signals(signum).name))
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda _signum, _frame: self.request_reload())

    def loop(self) -> int:
        capture = self.capture
        while not self._stop_requested.is_set():
            self._tick()
            frame = capture.get(LOOP_TICK_S)
            if frame is None:
                if capture.finished:
                    logger.info("agent: the source ended and every frame was scored (%d)", self.frames_scored)
                    break
                continue
            self.process(frame)
            if self.max_frames is not None and self.frames_scored >= self.max_frames:
                logger.info("agent: scored --max-frames %d", self.max_frames)
                break
        if self._stop_requested.is_set():
            logger.info("agent: stopping (%s)", self._stop_reason)
        self.stop_capture()
        if self._stop_requested.is_set():  # drain: frames already grabbed are scored, not lost
            drained = 0
            while True:
                frame = capture.get(0.0)
                if frame is None:
                    break
                self.process(frame)
                drained += 1
            if drained:
                logger.info("agent: scored %d frame(s) still queued", drained)
        return 0

    def process(self, frame: Frame) -> None:
        """Score one frame; publish an event if defective."""
        thresholds = self.watch.current
        self._check_channels(frame)
        try:
            scored = self.scorer.score(frame.image)
        except ImageError as exc:
            self.frames_failed += 1
            logger.warning("frame %s seq %d: not scored: %s", frame.source_id, frame.seq, exc)
            return
        size = frame_size_of(frame.image)
        result = judge(scored, thresholds, size)
        if result.defective:
            self._publish_defect(frame, result, thresholds, size)
        else:
            changed = self.drift.add(result.score)
            if self.drift_state is not None and self.drift_state.after_add(self.drift, self.clock.now):
                self._log_drift_switch()
                changed = True
            if changed:
                self._publish_drift(self._drift_published)
        self.frames_scored += 1
        self._fps_count += 1
        with self._latency_lock:
            self._latencies.append(self.clock.monotonic() - frame.grabbed)
        if not self.ready:
            self.ready = True
            self.state = STATE_RUNNING
            self._status_due = True
            logger.info(
                "agent: ready, first frame scored %.2fs after start", self.clock.monotonic() - self._started_at
            )
            self.notifier.ready(f"scoring camera {self.config.camera.name}")
        self._watchdog()

    def _check_channels(self, frame: Frame) -> None:
        mismatch = channel_mismatch(frame.image, self.bundle.preprocess.channels)
        if mismatch is None:
            return
        self.frames_channel_mismatch += 1
        if mismatch not in self._mismatch_warned:  # once per kind: every frame would flood the journal
            self._mismatch_warned.add(mismatch)
            self._status_due = True
            model = self.bundle.preprocess.channel_order
            logger.warning(
                "camera %s: %s (frame seq %d has %d channel(s), bundle %s expects channel_order %s): scored after "
                "conversion, but not as the model was trained, so scores may shift against the thresholds; set "
                "the camera's pixel format to match, or use a bundle trained on such frames (counted in status "
                "frames_channel_mismatch; warned once)",
                self.config.camera.name, mismatch, frame.seq, frame_channels(frame.image), self.bundle.name, model,
            )

    def _publish_defect(self, frame: Frame, result: Any, thresholds: Thresholds, size: Any) -> None:
        cam = self.config.camera.name
        station = self.config.mqtt.station
        fcfg = self.config.frames
        event_id = make_event_id(station, cam, self.boot_id, frame.seq)
        frame_path = None
        if self.frames is not None:
            saved = self.frames.save(frame.image, frame.timestamp, cam, frame.seq, event_id)
            frame_path = None if saved is None else str(saved)
        crop = None
        if fcfg.crop_in_event and result.regions:
            try:
                crop = encode_crop(frame.image, result.regions, fcfg.crop_max_px, fcfg.jpeg_quality)
            except ValueError as exc:
                logger.warning("frame %s seq %d: no crop: %s", frame.source_id, frame.seq, exc)
        payload = defect_event(
            event_id=event_id, station=station, camera=cam, seq=frame.seq, timestamp=frame.timestamp,
            image_score=result.score, image_threshold=result.image_threshold,
            regions=[r.to_dict() for r in result.regions], bundle_name=self.bundle.name,
            bundle_sha256=self.bundle.sha256, frame_path=frame_path, crop_jpeg_b64=crop, frame_size=size,
        )
        self.publisher.publish_event(event_id, payload)
        self.defects += 1
        # a frame flagged on its image score alone says so, rather than "0 region(s)"
        regions = f"{len(result.regions)} region(s)" if result.regions else NO_REGION
        logger.info(
            "defect: camera %s seq %d (%s) score %.4f > %.4f, %s, event %s",
            cam, frame.seq, frame.source_id, result.score, result.image_threshold, regions, event_id,
            extra={"event_id": event_id, "seq": frame.seq, "score": result.score, "source_id": frame.source_id},
        )

    def _log_drift_switch(self) -> None:
        f = self.drift.figures()
        logger.info("drift: the line's first %d good frames pooled with the calibration's %d: the reference is now %d "
                    "good frames (calibration+line, saved to %s); the CUSUM restarts", f.baseline_target,
                    f.calibration_frames, f.reference_frames, self.drift_state.path)
        self._log_drift_design()

    def _publish_drift(self, previous: Optional[str] = None, initial: bool = False) -> None:
        """The drift state or its reference changed (or the agent started): retained message, log line, counters."""
        figures = self.drift.figures()
        previous = previous or self._drift_published
        self._drift_published = figures.state
        if figures.state == previous and not initial:  # the reference changed (the switch to the pool), not the state
            self._status_due = True
            self.publisher.publish_drift(self._drift_message(previous, figures))
            return
        if not initial:
            self.drift_changes += 1
            if figures.state == DRIFT_RECALIBRATE:
                self.drift_alarms += 1
            elif figures.state == DRIFT_WARNING:
                self.drift_warnings += 1
        self._status_due = True
        self.publisher.publish_drift(self._drift_message(previous, figures))
        log = logger.warning if figures.state in (DRIFT_WARNING, DRIFT_RECALIBRATE) else logger.info
        if figures.limit is None:
            log("drift: %s -> %s: %s", previous, figures.state, figures.reason)
            return
        if figures.mean_z is None:
            log("drift: %s -> %s", previous, figures.state)
            return
        mean = "-" if figures.mean_z is None else f"{figures.mean_z:+.3f}"
        log("drift: %s -> %s: mean normal score %s over the last %d good frames (0 at calibration, %+.3f is a %gx "
            "false-alarm rate); CUSUM crossings since the thresholds loaded: %d above %.1f (recalibrate), %d above %.1f "
            "(warning)%s", previous, figures.state, mean, figures.window, figures.shift,
            figures.detect_false_alarm_ratio, figures.alarms, figures.limit, figures.warnings, figures.warning_limit,
            "; good parts score higher than at calibration: check the lamp, lens and parts, then recalibrate "
            "(`daad-calibrate capture` + `fit`), teach (`daad-calibrate teach`) or retrain"
            if figures.state == DRIFT_RECALIBRATE else "")

    def _drift_message(self, previous: str, figures: Any) -> Dict[str, Any]:
        return drift_payload(station=self.config.mqtt.station, timestamp=self.clock.now(), previous_state=previous,
                             figures=figures.to_dict(), bundle_name=self.bundle.name, bundle_sha256=self.bundle.sha256)

    # -- periodic work, from the loop ------------------------------------------------------------
    def _tick(self) -> None:
        reloaded = self.watch.poll()
        if reloaded is not None:
            self._status_due = True
            previous = self.drift.state
            self._reset_drift(reloaded)  # new thresholds: a new reference (its own state), restarted
            if self.drift.state != previous:
                self._publish_drift(previous)
        now = self.clock.monotonic()
        if self._status_due or now >= self._next_status:
            self._status_due = False
            self.publish_status()
        self._watchdog()

    def _watchdog(self) -> None:
        # The loop is alive; withhold the ping only if the capture thread is wedged in a driver call,
        # so that systemd restarts a process that cannot recover by itself.
        if not self.capture.wedged():
            self.notifier.watchdog()

    def _on_camera_state(self, state: str) -> None:
        self._status_due = True

    def camera_state(self) -> str:
        state = self.capture.state if self.capture is not None else cap.CONNECTING
        return state if state in CAMERA_STATES else "closed"  # every capture state is a payload state

    def recent_latencies_s(self) -> np.ndarray:
        """Grab-to-done seconds of the last LATENCY_WINDOW frames."""
        with self._latency_lock:
            return np.array(self._latencies, dtype=np.float64)

    def latency_ms(self) -> Dict[str, Optional[float]]:
        recent = self.recent_latencies_s()
        if recent.size == 0:
            return {"p50": None, "p99": None}
        p50, p99 = np.percentile(recent, [50, 99])
        return {"p50": float(p50) * 1e3, "p99": float(p99) * 1e3}

    def publish_status(self) -> None:
        now = self.clock.monotonic()
        elapsed = now - self._fps_since
        if elapsed >= self.config.mqtt.status_interval_s / 2:  # an early status (state change) keeps the last rate
            self._fps = self._fps_count / elapsed
            self._fps_count = 0
            self._fps_since = now
        self._next_status = now + self.config.mqtt.status_interval_s
        if self.state == STATE_STARTING and self.capture is not None and self.capture.last_error:
            self.state = STATE_DEGRADED  # the camera failed before its first frame: not "starting" for ever
        if self.state not in (STATE_STARTING, STATE_STOPPING):
            streaming = self.capture.state in (cap.STREAMING, cap.ENDED)
            self.state = STATE_RUNNING if streaming else STATE_DEGRADED
        stats = self.publisher.stats()
        thresholds = self.watch.current
        payload = status_payload(
            station=self.config.mqtt.station, state=self.state, fps=self._fps, latency_ms=self.latency_ms(),
            frames_scored=self.frames_scored, frames_dropped=self.capture.dropped if self.capture else 0,
            defects=self.defects, spool_depth=int(stats.get("spool_depth", 0)),
            spool_dropped=int(stats.get("spool_dropped", 0)) + int(stats.get("unspooled_dropped", 0)),
            camera_state=self.camera_state(),
            mqtt_connected=bool(stats.get("connected", False)), image_threshold=thresholds.image_threshold,
            pixel_threshold=thresholds.pixel_threshold, bundle_name=self.bundle.name,
            bundle_sha256=self.bundle.sha256, uptime_s=now - self._started_at, timestamp=self.clock.now(),
            camera_error=self.capture.last_error if self.capture else None,
            frames_channel_mismatch=self.frames_channel_mismatch,
            mqtt_last_error=stats.get("last_connect_error"),
            mqtt_connect_failures=int(stats.get("connect_failures", 0)),
            events_unspooled=int(stats.get("unspooled", 0)),
            spool_write_failures=int(stats.get("spool_errors", 0)),
            drift=None if self.drift is None else self.drift.figures().to_dict(),
        )
        self.publisher.publish_status(payload)
        self.notifier.status(status_line(self.state, self._fps, self.frames_scored, self.defects, payload, stats))

    def snapshot(self) -> Dict[str, Any]:
        """Counters for the Prometheus endpoint (read from its thread; plain reads are enough)."""
        stats = self.publisher.stats() if self.publisher is not None else {}
        lat = self.latency_ms()
        thresholds = self.watch.current if self.watch is not None else None
        drift = self.drift.figures() if self.drift is not None else None
        return {
            "up": 1,
            "frames_scored_total": self.frames_scored,
            "frames_dropped_total": self.capture.dropped if self.capture else 0,
            "defects_total": self.defects,
            "fps": self._fps,
            "latency_p50_seconds": None if lat["p50"] is None else lat["p50"] / 1e3,
            "latency_p99_seconds": None if lat["p99"] is None else lat["p99"] / 1e3,
            "camera_reconnects_total": self.capture.reconnects if self.capture else 0,
            "camera_streaming": int(self.capture is not None and self.capture.state == cap.STREAMING),
            "spool_depth": stats.get("spool_depth"),
            "spool_dropped_total": stats.get("spool_dropped"),
            "mqtt_connected": int(bool(stats.get("connected", False))),
            "mqtt_connect_failures_total": stats.get("connect_failures"),
            "mqtt_connect_error": stats.get("connect_error"),
            "frames_channel_mismatch_total": self.frames_channel_mismatch,
            "events_unspooled": stats.get("unspooled"),
            "spool_write_failures_total": stats.get("spool_errors"),
            "image_threshold": None if thresholds is None else thresholds.image_threshold,
            "pixel_threshold": None if thresholds is None else thresholds.pixel_threshold,
            "thresholds_reloads_total": self.watch.reloads if self.watch else 0,
            "thresholds_rejected_total": self.watch.rejected if self.watch else 0,
            "uptime_seconds": self.clock.monotonic() - self._started_at,
            "drift_state": None if drift is None else drift.state,
            "drift_cusum": None if drift is None else drift.cusum,
            "drift_cusum_limit": None if drift is None else drift.limit,
            "drift_mean_z": None if drift is None else drift.mean_z,
            "drift_reference_frames": None if drift is None else drift.reference_frames,
            "drift_baseline_frames": None if drift is None else drift.baseline_collected,
            "drift_changes_total": self.drift_changes,
            "drift_warnings_total": self.drift_warnings,
            "drift_alarms_total": self.drift_alarms,
        }

    # -- stop, in reverse --------------------------------------------------------------------------
    def stop_capture(self) -> None:
        if "capture" in self._started:
            self._started.remove("capture")
            self.capture.stop(CAPTURE_STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Reverse of start, then of init. Idempotent; each step runs even if another failed."""
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping("stopping")
        self.state = STATE_STOPPING
        self.stop_capture()
        if "metrics" in self._started:
            self._started.remove("metrics")
            _quietly(self.metrics.stop, "metrics")
        if "publisher" in self._started:
            self._started.remove("publisher")
            _quietly(self.publish_status, "final status")
            _quietly(lambda: self.publisher.stop(PUBLISHER_STOP_TIMEOUT_S), "publisher")
        if self.drift_state is not None and self.drift is not None and self.drift.collecting_baseline:
            _quietly(lambda: self.drift_state.save(self.drift, self.clock.now), "drift state")  # the partial baseline
        if self.spool is not None:
            _quietly(self.spool.close, "spool")
        if self.backend is not None and self._own_backend:
            _quietly(self.backend.close, "backend")
        self.notifier.close()
        logger.info(
            "agent: stopped; %d frames scored, %d defects, %d dropped",
            self.frames_scored, self.defects, self.capture.dropped if self.capture else 0,
        )


def status_line(state: str, fps: float, scored: int, defects: int, payload: Dict[str, Any],
                stats: Dict[str, Any]) -> str:
    """The one line `systemctl status` shows: counters, then what is wrong, if anything."""
    line = (f"{state}: {fps:.1f} fps, {scored} scored, {defects} defects, camera {payload['camera_state']}, "
            f"spool {payload['spool_depth']}")
    problems = []
    if payload.get("camera_error") and payload["camera_state"] != "streaming":
        problems.append(f"camera: {payload['camera_error']}")
    if stats.get("connect_error"):
        problems.append(f"mqtt: {stats['connect_error']}")
    if payload.get("events_unspooled"):
        problems.append(f"{payload['events_unspooled']} event(s) not on disk (spool not writable)")
    return line + "".join(f"; {p}" for p in problems)


def _quietly(step: Any, what: str) -> None:
    try:
        step()
    except Exception:  # stopping must go on; the error is still visible
        logger.exception("agent: stopping %s failed", what)
