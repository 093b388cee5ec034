"""`daad-agent --check-config`: a start short of the camera and the broker.

The same init steps as App.run, in the same order and through the same calls (bundle with its manifest
and graph check, thresholds bound to it, the backend with its blank-frame self-test), then the thresholds
judged against that frame's map; the camera pipeline and the MQTT settings are built and checked without
opening anything. Whatever a real start would refuse before its first frame is refused here, as the same
one-line error. One difference: a TensorRT plan is never built here (minutes, and install.sh runs this as
root before the unit's ExecStartPre builds it as the service user); without a cached plan the graph is
loaded and scored with ONNX Runtime, and the report says so.
"""
from __future__ import annotations

import importlib.util
from typing import Any, List, Optional

from engine.backend import Backend, open_backend
from engine.bundle import describe
from engine.errors import ConfigError, ThresholdsError
from engine.scoring import judge

from .app import App
from .sdnotify import SystemdNotifier


def check_thresholds_fit_map(thresholds: Any, map_shape: tuple, path: Any) -> None:
    """Thresholds that can never produce a region on this bundle's map are a mistake, not a setting."""
    pixels = int(map_shape[0]) * int(map_shape[1])
    if thresholds.min_defect_area > pixels:
        raise ThresholdsError(f"{path}: field `min_defect_area` is {thresholds.min_defect_area} but the bundle's "
                              f"anomaly map has {map_shape[0]}x{map_shape[1]} = {pixels} pixels, so no region can "
                              "ever be reported; recalibrate with `daad-calibrate fit`")


def preflight(config: Any, config_file: Optional[str] = None) -> List[str]:
    """Lines describing what was checked; raises the DaadError a real start would raise."""
    from camera.sources import open_source

    from .mqtt import resolve_password

    app = App(config, config_file=config_file, notifier=SystemdNotifier(environ={}))
    backend: Optional[Backend] = None
    try:
        app.init_bundle()
        app.init_thresholds()
        backend = app.backend = open_backend_without_building(config.model, app.bundle, config_file)
        app.init_backend()
        thresholds = app.watch.current
        blank = app.blank
        check_thresholds_fit_map(thresholds, blank.anomaly_map.shape, config.thresholds.path)
        verdict = judge(blank, thresholds, (blank.anomaly_map.shape[1], blank.anomaly_map.shape[0]))  # (w, h)
        source = open_source(config.camera)  # builds pipeline strings; opens nothing
        resolve_password(config.mqtt)
        return [
            f"bundle: {describe(app.bundle)}, manifest "
            f"{'verified' if app.bundle.manifest_sha256 else 'absent (re-export the bundle)'}, "
            + (f"signature verified (key {app.signed_by})" if app.signed_by else "signature not checked "
               "(no model.public_key)"),
            f"thresholds: image {thresholds.image_threshold:.6g}, pixel {thresholds.pixel_threshold:.6g}, "
            f"min area {thresholds.min_defect_area} (made for this bundle)",
            f"backend: {app.backend.name} scored a blank frame: {blank.score:.6g} "
            f"({'above' if verdict.defective else 'not above'} the image threshold)"
            + (" (no TensorRT plan cached yet: the unit's ExecStartPre builds it)"
               if config.model.backend != "onnxruntime" and app.backend.name == "onnxruntime" else ""),
            f"camera: {config.camera.name}: {source.describe()}, mode {config.camera.mode} (not opened)",
            f"mqtt: {config.mqtt.host}:{config.mqtt.port} station {config.mqtt.station} (not connected)",
        ]
    finally:
        if backend is not None:
            backend.close()


def open_backend_without_building(model: Any, bundle: Any, config_file: Optional[str] = None) -> Backend:
    """The configured backend, using a cached TensorRT plan but never building one (else ONNX Runtime)."""
    if model.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise ConfigError(f"{config_file or 'agent.yaml'}: model.backend: got 'tensorrt', but TensorRT is not "
                          "importable here (JetPack's python3-libnvinfer, seen through a venv made with "
                          "--system-site-packages); set model.backend: auto or onnxruntime")
    prefer = "onnxruntime" if model.backend == "onnxruntime" else "auto"
    return open_backend(bundle, prefer=prefer, precision=model.precision, plan_cache=model.plan_cache,
                        build_if_missing=False)
