"""Where TensorRT plans, timing caches and INT8 calibration caches live on the device.

A plan is only valid for the ONNX graph, TensorRT version and GPU it was built on (plans are not
portable, and `deserialize_cuda_engine` refuses others), so each one is stored with the full key it
was built for and is loaded only when that key matches exactly; anything else is rebuilt.

Layout under the cache directory:
    plans/<readable key>-<digest>/model.plan   the serialized engine, as TensorRT wrote it (no header)
    plans/<readable key>-<digest>/key.json     {"format", "key": PlanKey, "plan": {sha256, bytes}, "built": {...}}
    timing/trt<version>-<gpu>-sm<cc>.cache      builder timing cache, one per TensorRT version and GPU
    calibration/<graph>-trt<version>-<images>.cache   INT8 calibration cache per graph and image set
Every file is written to a temporary file and renamed, so a crash never leaves a partial one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .bundle import atomic_write_bytes, sha256_file
from .errors import EngineBuildError

logger = logging.getLogger(__name__)

ENV_CACHE_DIR = "DAAD_PLAN_CACHE"  # explicit override
ENV_SYSTEMD_CACHE = "CACHE_DIRECTORY"  # set by systemd from CacheDirectory= (colon-separated)
DEFAULT_CACHE_DIR = Path("~/.cache/daad-inspect/plans")
PLAN_FILE = "model.plan"
KEY_FILE = "key.json"
SIDECAR_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")


def default_cache_dir() -> Path:
    """$DAAD_PLAN_CACHE, else systemd's $CACHE_DIRECTORY/plans, else ~/.cache/daad-inspect/plans."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    systemd = os.environ.get(ENV_SYSTEMD_CACHE)
    if systemd:
        return Path(systemd.split(":")[0]) / "plans"
    return DEFAULT_CACHE_DIR.expanduser()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; two builds with equal keys are interchangeable."""

    bundle_sha256: str  # SHA-256 of the ONNX graph the plan is built from (bundle.graph(batch).sha256)
    trt_version: str  # tensorrt.__version__, e.g. "8.5.2.2": plans never cross TensorRT versions
    gpu_name: str  # device name and SM count, e.g. "Orin (16 SMs)": Orin modules share a name
    compute_capability: str  # "8.7" (Orin), "7.2" (Xavier)
    precision: str  # fp32 | fp16 | int8
    input_shape: Tuple[int, ...]  # (C, H, W) of one image
    batch: int

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineBuildError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "bundle_sha256": self.bundle_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "input_shape": list(self.input_shape),
            "batch": int(self.batch),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PlanKey":
        return cls(
            bundle_sha256=str(d["bundle_sha256"]),
            trt_version=str(d["trt_version"]),
            gpu_name=str(d["gpu_name"]),
            compute_capability=str(d["compute_capability"]),
            precision=str(d["precision"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),
            batch=int(d["batch"]),
        )

    def digest(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def dirname(self) -> str:
        """Readable for people listing the cache; the digest makes it unique for the whole key."""
        shape = "x".join(str(d) for d in self.input_shape)
        cc = self.compute_capability.replace(".", "")
        return (f"{self.bundle_sha256[:12]}-{self.precision}-b{self.batch}-{shape}"
                f"-trt{_slug(self.trt_version)}-sm{cc}-{self.digest()[:10]}")

    def describe(self) -> str:
        return (f"{self.precision} batch {self.batch} input {'x'.join(map(str, self.input_shape))} for graph "
                f"{self.bundle_sha256[:12]} on {self.gpu_name} (sm {self.compute_capability}), TensorRT {self.trt_version}")


def key_differences(expected: Dict[str, Any], found: Any) -> List[str]:
    """Human-readable fields in which a stored key differs from the wanted one."""
    if not isinstance(found, dict):
        return ["key missing"]
    return [f"{k}: wanted {expected.get(k)!r}, plan has {found.get(k)!r}"
            for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]


class PlanCache:
    """One cache directory (see the module docstring for its layout)."""

    def __init__(self, root: Optional[Union[str, Path]] = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def plan_dir(self, key: PlanKey) -> Path:
        return self.root / "plans" / key.dirname()

    def plan_path(self, key: PlanKey) -> Path:
        return self.plan_dir(key) / PLAN_FILE

    def key_path(self, key: PlanKey) -> Path:
        return self.plan_dir(key) / KEY_FILE

    def _read_sidecar(self, path: Path) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            logger.warning("plan cache: %s unreadable (%s); the plan will be rebuilt", path, exc.__class__.__name__)
            return None
        return data if isinstance(data, dict) else None

    def find_plan(self, key: PlanKey) -> Optional[Path]:
        """The plan built for exactly this key, or None (with the reason logged) when it must be (re)built."""
        plan, sidecar = self.plan_path(key), self.key_path(key)
        if not plan.is_file():
            logger.info("plan cache: no plan for %s in %s", key.describe(), self.root)
            return None
        if not sidecar.is_file():
            logger.warning("plan cache: %s has no %s (interrupted build?); it will be rebuilt", plan, KEY_FILE)
            return None
        data = self._read_sidecar(sidecar)
        if data is None:
            return None
        if data.get("format") != SIDECAR_FORMAT:
            logger.warning("plan cache: %s has format %r, expected %d; rebuilding", sidecar, data.get("format"), SIDECAR_FORMAT)
            return None
        diffs = key_differences(key.to_dict(), data.get("key"))
        if diffs:
            logger.warning("plan cache: %s was built for another key (%s); it will not be loaded", plan, "; ".join(diffs))
            return None
        recorded = data.get("plan") or {}
        size = plan.stat().st_size
        if size != recorded.get("bytes") or sha256_file(plan) != recorded.get("sha256"):
            logger.warning("plan cache: %s does not match the SHA-256/size in %s (truncated or replaced); rebuilding",
                           plan, KEY_FILE)
            return None
        return plan

    def read_built_info(self, key: PlanKey) -> Dict[str, Any]:
        """The `built` section of a plan's sidecar (precision details, calibration set, timings); {} if none."""
        data = self._read_sidecar(self.key_path(key)) if self.key_path(key).is_file() else None
        return dict((data or {}).get("built") or {})

    def store_plan(self, key: PlanKey, plan: bytes, built: Optional[Dict[str, Any]] = None) -> Path:
        """Write plan then sidecar, each atomically; the sidecar goes last so a half-done store never matches."""
        path, sidecar = self.plan_path(key), self.key_path(key)
        data = {
            "format": SIDECAR_FORMAT,
            "key": key.to_dict(),
            "plan": {"sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)},
            "built": built or {},
        }
        try:
            if sidecar.exists():
                sidecar.unlink()
            atomic_write_bytes(path, plan)
            atomic_write_bytes(sidecar, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        except OSError as exc:
            raise EngineBuildError(
                f"{path}: cannot write the plan ({exc.strerror or exc}); make the cache directory writable, pass "
                f"--cache-dir, set ${ENV_CACHE_DIR}, or give the systemd unit CacheDirectory="
            ) from exc
        return path

    def remove_plan(self, key: PlanKey) -> None:
        for p in (self.key_path(key), self.plan_path(key)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def plans_for(self, bundle_sha256: str) -> List[Tuple[PlanKey, Path]]:
        """Every complete plan in the cache built from this graph (any device or precision)."""
        found: List[Tuple[PlanKey, Path]] = []
        plans_root = self.root / "plans"
        if not plans_root.is_dir():
            return found
        for sidecar in sorted(plans_root.glob(f"{bundle_sha256[:12]}-*/{KEY_FILE}")):
            data = self._read_sidecar(sidecar)
            try:
                key = PlanKey.from_dict((data or {})["key"])
            except (KeyError, TypeError, ValueError, EngineBuildError):
                continue
            if key.bundle_sha256 == bundle_sha256 and (sidecar.parent / PLAN_FILE).is_file():
                found.append((key, sidecar.parent / PLAN_FILE))
        return found

    def timing_cache_path(self, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
        cc = compute_capability.replace(".", "")
        return self.root / "timing" / f"trt{_slug(trt_version)}-{_slug(gpu_name)}-sm{cc}.cache"

    def calibration_cache_path(self, graph_sha256: str, trt_version: str, images_digest: str) -> Path:
        return self.root / "calibration" / f"{graph_sha256[:16]}-trt{_slug(trt_version)}-{images_digest[:12]}.cache"

    def read_bytes(self, path: Path) -> Optional[bytes]:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("plan cache: cannot read %s (%s); ignoring it", path, exc)
            return None

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Atomic write of a cache file; a failure is logged, not raised (these caches only save time)."""
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            logger.warning("plan cache: cannot write %s (%s); the next build will be slower", path, exc)
