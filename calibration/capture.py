"""Capture: score N good frames with the bundle and keep everything a threshold fit needs.

A capture directory holds
    frames/000000.png ...   the frames as the camera (or the image folder) gave them
    scores.csv              one row per frame: image score and map summary (for people and spreadsheets)
    maps.npz                compressed: scores (N,), maps (N, H, W) float32 at model resolution, frame names
    capture.yaml            bundle identity, source, time, frame sizes, skipped files, warnings
Frames come from an image folder (`--images`) or from the agent's camera (`--config`: its agent.yaml's camera
and model sections, the camera opened and kept by camera.loop as the agent does); both are scored by
engine.scoring with the backend the agent uses, so scores match the service.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict

from camera.config import CameraConfig, camera_problems
from camera.loop import CaptureLoop
from camera.sources import open_source
from engine.backend import Backend, open_backend
from engine.bundle import Bundle, atomic_write_bytes, atomic_write_text, load_bundle
from engine.config_file import load_yaml_model
from engine.errors import CameraError, ConfigError, DaadError, ImageError
from engine.model_section import ModelSection
from engine.preprocess import images_in, read_image
from engine.scoring import ScoredFrame, score_frame
from engine.validation import read_yaml

from . import stats

logger = logging.getLogger(__name__)

CAPTURE_FORMAT_VERSION = 1
CAPTURE_YAML = "capture.yaml"
SCORES_CSV = "scores.csv"
MAPS_NPZ = "maps.npz"
FRAMES_DIR = "frames"
CAPTURE_FILES = (CAPTURE_YAML, SCORES_CSV, MAPS_NPZ)
MAX_LISTED_SKIPPED = 50  # capture.yaml names this many unreadable files, then counts the rest
CAMERA_STALL_S = 10.0  # a camera silent this long ends the capture
CAMERA_POLL_S = 0.1  # how long to wait for a frame before checking whether the camera ended or failed
MAP_SUMMARY_QUANTILES = (0.5, 0.99, 0.999)  # per-frame map quantiles written to scores.csv


PROVENANCE_MODULES = ("numpy", "scipy", "onnxruntime", "cv2", "tensorrt")  # reported when already imported


def software_versions() -> Dict[str, str]:
    """Versions for provenance, without importing anything new (engine.bundle's version imports torch: seconds)."""
    import platform
    import sys

    versions = {"python": platform.python_version()}
    for name in PROVENANCE_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    try:
        from importlib.metadata import PackageNotFoundError, version

        versions["daad-inspect"] = version("daad-inspect")
    except (ImportError, PackageNotFoundError):  # running from a checkout that is not installed
        pass
    return versions


class CaptureError(DaadError):
    """A capture directory is missing, damaged, or was scored with another bundle."""


@dataclass
class Capture:
    """A capture directory read back."""

    root: Path
    meta: Dict[str, Any]
    scores: np.ndarray  # (N,) float64
    maps: np.ndarray  # (N, H, W) float32
    frame_files: List[str]  # relative to root, e.g. frames/000000.png
    source_names: List[str]

    @property
    def bundle_sha256(self) -> str:
        return str((self.meta.get("bundle") or {}).get("sha256", ""))

    @property
    def bundle_name(self) -> str:
        return str((self.meta.get("bundle") or {}).get("name", ""))

    @property
    def n(self) -> int:
        return int(self.scores.size)


def score_frames(frames: Iterable[Tuple[str, np.ndarray]], bundle: Bundle,
                 backend: Backend) -> Iterator[Tuple[str, np.ndarray, ScoredFrame]]:
    """(name, image, scored) for each (name, image), scored one at a time as the agent does (engine.scoring)."""
    for name, image in frames:
        try:
            yield name, image, score_frame(image, bundle.preprocess, backend)
        except ImageError as exc:
            raise ImageError(f"{name}: {exc}") from exc


def read_image_files(paths: Iterable[Path], skipped: List[str]) -> Iterator[Tuple[str, np.ndarray]]:
    """Decode image files; an unreadable one is skipped with a warning and appended to `skipped`."""
    for path in paths:
        try:
            yield str(path), read_image(path)
        except ImageError as exc:
            logger.warning("skipped %s", exc)
            skipped.append(str(path))


def image_folder(folder: Union[str, Path]) -> List[Path]:
    """The images of a folder, or CaptureError saying why there are none."""
    return images_in(folder, CaptureError, "image", "; pass a folder of good-part images with --images")


def prepare_out_dir(out: Union[str, Path], force: bool) -> Path:
    """Refuse to mix two captures in one folder unless --force (which removes only capture files)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CaptureError(f"{out}: exists and is not a folder; choose another --out")
    existing = [out / f for f in CAPTURE_FILES if (out / f).exists()]
    frames_dir = out / FRAMES_DIR
    if existing or (frames_dir.is_dir() and any(frames_dir.iterdir())):
        if not force:
            raise CaptureError(f"{out}: already holds a capture; choose another --out or pass --force to replace it")
        for f in existing:
            f.unlink()
        if frames_dir.is_dir():
            for f in frames_dir.glob("*.png"):
                f.unlink()
    frames_dir.mkdir(parents=True, exist_ok=True)
    return out


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ImageError(f"cannot encode a frame of shape {image.shape} and dtype {image.dtype} as PNG")
    return buf.tobytes()


def _map_summary(anomaly_map: np.ndarray) -> Dict[str, float]:
    flat = anomaly_map.reshape(-1)
    out = {"map_max": float(flat.max()), "map_mean": float(flat.mean())}
    for q, v in zip(MAP_SUMMARY_QUANTILES, np.quantile(flat, MAP_SUMMARY_QUANTILES)):
        out["map_p" + f"{q * 100:.1f}".rstrip("0").rstrip(".")] = float(v)
    return out


def run_capture(
    frames: Iterable[Tuple[str, np.ndarray]],
    bundle: Bundle,
    backend: Backend,
    n_frames: int,
    out: Union[str, Path],
    source: Dict[str, Any],
    skipped: Optional[List[str]] = None,
    progress: bool = True,
) -> Capture:
    """Score up to n_frames frames and write the capture directory; Ctrl-C stops early and keeps what was scored."""
    from tqdm import tqdm

    out = Path(out)
    skipped = skipped if skipped is not None else []
    started = datetime.now(timezone.utc)
    rows: List[Dict[str, Any]] = []
    maps: List[np.ndarray] = []
    sizes: Dict[str, int] = {}
    warnings: List[str] = []
    bar = tqdm(total=n_frames, desc="capture", unit="frame", disable=None if progress else True)
    interrupted = False
    try:
        for name, image, scored in score_frames(frames, bundle, backend):
            index = len(rows)
            frame_file = f"{FRAMES_DIR}/{index:06d}.png"
            (out / frame_file).write_bytes(_encode_png(image))
            h, w = image.shape[:2]
            sizes[f"{w}x{h}"] = sizes.get(f"{w}x{h}", 0) + 1
            rows.append({"index": index, "frame": frame_file, "source": name, "score": scored.score,
                         **_map_summary(scored.anomaly_map)})
            maps.append(np.asarray(scored.anomaly_map, dtype=np.float32))
            bar.update(1)
            if len(rows) >= n_frames:
                break
    except KeyboardInterrupt:
        interrupted = True
        warnings.append(f"capture interrupted after {len(rows)} of {n_frames} frames; what was scored is kept")
        logger.warning(warnings[-1])
    finally:
        bar.close()
    if not rows:
        raise CaptureError(f"{source.get('path', source)}: no frame could be read and scored; nothing was captured")
    if len(rows) < n_frames and not interrupted:
        warnings.append(f"only {len(rows)} of the {n_frames} requested frames were available")
        logger.warning(warnings[-1])
    if skipped:
        warnings.append(f"{len(skipped)} unreadable image(s) skipped (listed under `skipped` in {CAPTURE_YAML})")
        logger.warning(warnings[-1])
    if len(sizes) > 1:
        warnings.append(f"frames come in {len(sizes)} sizes ({', '.join(sorted(sizes))}): all are stretched to the model "
                        f"input, so mixed sizes or camera settings shift the scores; capture from one camera setting")
        logger.warning(warnings[-1])
    scores = np.asarray([r["score"] for r in rows], dtype=np.float64)
    shift = stats.score_shift_warning(scores, bundle.score_stats)
    if shift:
        warnings.append(shift)
        logger.warning(shift)
    if len(rows) < stats.MIN_FRAMES:
        warnings.append(f"{len(rows)} frames are fewer than the {stats.MIN_FRAMES} `daad-calibrate fit` needs; capture more")
        logger.warning(warnings[-1])
    maps_arr = np.stack(maps, axis=0)
    _write_scores_csv(out / SCORES_CSV, rows)
    buf = io.BytesIO()
    np.savez_compressed(buf, scores=scores, maps=maps_arr,
                        frames=np.asarray([r["frame"] for r in rows]), sources=np.asarray([r["source"] for r in rows]))
    atomic_write_bytes(out / MAPS_NPZ, buf.getvalue())
    meta = {
        "format_version": CAPTURE_FORMAT_VERSION,
        "bundle": {"sha256": bundle.sha256, "name": bundle.name, "path": str(Path(bundle.root).resolve())},
        "bundle_score_stats": dict(bundle.score_stats),
        "backend": getattr(backend, "name", type(backend).__name__),
        "source": source,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_frames": len(rows),
        "frames_requested": int(n_frames),
        "frame_sizes": sizes,
        "map_size": [int(maps_arr.shape[1]), int(maps_arr.shape[2])],
        "skipped": {"count": len(skipped), "files": skipped[:MAX_LISTED_SKIPPED]},
        "score_quantiles": stats.score_quantiles(scores),
        "warnings": warnings,
        "software": software_versions(),
    }
    atomic_write_text(out / CAPTURE_YAML, yaml.safe_dump(meta, sort_keys=False))
    return Capture(root=out, meta=meta, scores=scores, maps=maps_arr, frame_files=[r["frame"] for r in rows],
                   source_names=[r["source"] for r in rows])


def _write_scores_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, text.getvalue())


def capture_from_images(
    images: Union[str, Path],
    bundle_path: Union[str, Path],
    out: Union[str, Path],
    n_frames: Optional[int] = None,
    backend: str = "auto",
    force: bool = False,
    progress: bool = True,
    precision: str = "fp32",
) -> Capture:
    """`daad-calibrate capture --images DIR --bundle B`: the first n_frames images by name (all when None)."""
    files = image_folder(images)
    bundle = load_bundle(bundle_path)
    if n_frames is not None and n_frames < 1:
        raise CaptureError(f"--frames must be at least 1, got {n_frames}")
    n = len(files) if n_frames is None else n_frames
    out_dir = prepare_out_dir(out, force)
    skipped: List[str] = []
    source = {"kind": "images", "path": str(Path(images).resolve()), "images_in_folder": len(files)}
    # read lazily and stop at n: a corrupt file is replaced by the next one
    with open_backend(bundle, prefer=backend, precision=precision) as be:
        return run_capture(read_image_files(files, skipped), bundle, be, n, out_dir, source, skipped, progress)


def camera_frames(loop: CaptureLoop, interval_s: float = 0.0) -> Iterator[Tuple[str, np.ndarray]]:
    """Frames of a started capture loop (camera.loop, the agent's), at least `interval_s` apart by grab time.

    Ends when the source ends (a folder or file read through), or when the loop has failed (a stall, a read
    error, a failed open) and no frame is waiting: a capture keeps what it has rather than wait for a reopen.
    A failure before the first frame is a CameraError naming its cause. Consecutive frames of one part are
    nearly identical; spacing them makes the calibration set a sample of many parts, which the false-alarm
    statements assume.
    """
    last_kept = -math.inf
    received = 0
    while True:
        frame = loop.get(CAMERA_POLL_S)
        if frame is None:
            if loop.failures:
                why = loop.last_error or loop.state
                if received == 0:
                    raise CameraError(f"camera {loop.source.source_id}: {why}; check the `camera` section of the agent config")
                logger.warning("camera failed after %d frames (%s): capture ends early", received, why)
                return
            if loop.finished:
                return
            continue
        received += 1
        if frame.grabbed - last_kept < interval_s:
            continue
        last_kept = frame.grabbed
        yield f"{frame.source_id}#{frame.seq}", frame.image


class _AgentYamlView(BaseModel):
    """The sections of agent.yaml a capture uses (validated as the agent does); the rest is the agent's."""

    model_config = ConfigDict(extra="ignore")
    camera: CameraConfig
    model: ModelSection


def capture_from_config(
    config_path: Union[str, Path],
    out: Union[str, Path],
    n_frames: int,
    interval_s: float = 0.0,
    force: bool = False,
    progress: bool = True,
) -> Capture:
    """`daad-calibrate capture --config AGENT.yaml`: the agent's own camera, bundle and backend."""
    config_path = Path(config_path)
    if n_frames < 1:
        raise CaptureError(f"--frames must be at least 1, got {n_frames}")
    config = load_yaml_model(config_path, _AgentYamlView, "pass --config /etc/daad-inspect/agent.yaml")
    # files are not checked: the bundle is checked by load_bundle below and the camera by opening it
    problems = camera_problems(config.camera, check_files=False)
    if problems:
        raise ConfigError("\n".join(f"{config_path}: {p}" for p in problems))
    bundle = load_bundle(config.model.bundle)
    out_dir = prepare_out_dir(out, force)
    cam = config.camera
    source = open_source(cam)
    source_meta = {"kind": "camera", "config": str(config_path.resolve()), "camera": str(cam.name),
                   "source": source.describe(), "interval_s": float(interval_s)}
    # mode every: nothing is dropped, scoring paces reading, as a file or folder is read by the agent
    loop = CaptureLoop(source, mode="every", queue_size=cam.queue_size, stall_timeout_s=CAMERA_STALL_S,
                       reopen_min_s=cam.reopen_min_s, reopen_max_s=cam.reopen_max_s)
    # the agent's backend and precision: fp16 TensorRT scores differ slightly from fp32
    with open_backend(bundle, prefer=config.model.backend, precision=config.model.precision,
                      plan_cache=config.model.plan_cache) as be:
        loop.start()
        try:
            return run_capture(camera_frames(loop, interval_s), bundle, be, n_frames, out_dir, source_meta,
                               progress=progress)
        finally:
            loop.stop()


# ---------------------------------------------------------------- reading a capture back


def load_capture(path: Union[str, Path], bundle: Optional[Bundle] = None) -> Capture:
    """Read a capture directory; refuse one scored with another bundle than `bundle`."""
    root = Path(path)
    yaml_path = root / CAPTURE_YAML
    if not root.is_dir():
        raise CaptureError(f"{root}: capture folder not found; create it with `daad-calibrate capture`")
    if not yaml_path.is_file():
        raise CaptureError(f"{yaml_path}: not found; {root} is not a capture folder (create one with `daad-calibrate capture`)")
    meta = read_yaml(yaml_path, CaptureError, "capture again")
    if not isinstance(meta, dict) or meta.get("format_version") != CAPTURE_FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CaptureError(f"{yaml_path}: field `format_version` is {version!r}, expected {CAPTURE_FORMAT_VERSION}; capture again")
    sha = str((meta.get("bundle") or {}).get("sha256", ""))
    if bundle is not None and not bundle.binding(sha):  # "graph": a capture made before bundle manifests
        raise CaptureError(
            f"{yaml_path}: field `bundle.sha256` is {sha[:12]}... but the bundle {bundle.root} is {bundle.sha256[:12]}...; "
            f"this capture was scored with another model: capture again with this bundle"
        )
    npz_path = root / MAPS_NPZ
    try:
        with np.load(str(npz_path), allow_pickle=False) as data:
            scores = np.asarray(data["scores"], dtype=np.float64)
            maps = np.asarray(data["maps"], dtype=np.float32)
            frames = [str(f) for f in data["frames"]]
            sources = [str(s) for s in data["sources"]]
    except FileNotFoundError:
        raise CaptureError(f"{npz_path}: missing; the capture is incomplete, capture again") from None
    except (OSError, ValueError, KeyError) as exc:
        raise CaptureError(f"{npz_path}: damaged ({exc}); capture again") from exc
    if maps.ndim != 3 or maps.shape[0] != scores.size or len(frames) != scores.size:
        raise CaptureError(f"{npz_path}: {scores.size} scores but maps of shape {maps.shape}; the capture is damaged, capture again")
    if bundle is not None:
        expected = (bundle.preprocess.height, bundle.preprocess.width)
        if tuple(maps.shape[1:]) != expected:
            raise CaptureError(f"{npz_path}: maps are {maps.shape[1]}x{maps.shape[2]} but the bundle's are "
                               f"{expected[0]}x{expected[1]}; capture again with this bundle")
    return Capture(root=root, meta=meta, scores=scores, maps=maps, frame_files=frames, source_names=sources)
