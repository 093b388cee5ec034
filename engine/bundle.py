"""The model bundle: a self-describing directory (model.onnx + bundle.yaml) that travels
from the desktop to the Jetson. train/ writes it (train.export), everything else reads it here.
"""
from __future__ import annotations

import hashlib
import sys
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Type, Union

import yaml

from .errors import BundleError, DaadError
from .preprocess import PreprocessSpec

BUNDLE_FORMAT_VERSION = 1
BUNDLE_YAML = "bundle.yaml"
INPUT_NAME = "image"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"
HASH_CHUNK = 1 << 20


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(str(target.parent), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_yaml(path: Path, error: Type[DaadError], fix: str) -> Any:
    """Parse a YAML file; a syntax or encoding error becomes `error` naming the file and the fix."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid YAML ({exc.__class__.__name__}); {fix}") from exc


@dataclass(frozen=True)
class OnnxGraph:
    """One exported graph of the bundle, at one fixed batch size."""

    file: str
    sha256: str
    batch: int


@dataclass
class Bundle:
    """A validated bundle on disk."""

    root: Path
    name: str
    preprocess: PreprocessSpec
    graphs: Tuple[OnnxGraph, ...]
    opset: int
    score_stats: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)  # the whole bundle.yaml

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its batch-1 graph (thresholds and plans are keyed by it)."""
        return self.graph(1).sha256

    @property
    def input_name(self) -> str:
        return str(self.metadata.get("input", {}).get("name", INPUT_NAME))

    @property
    def map_output(self) -> str:
        return str(self.metadata.get("outputs", {}).get("anomaly_map", MAP_OUTPUT))

    @property
    def score_output(self) -> str:
        return str(self.metadata.get("outputs", {}).get("score", SCORE_OUTPUT))

    @property
    def batch_sizes(self) -> Tuple[int, ...]:
        return tuple(g.batch for g in self.graphs)

    def graph(self, batch: int = 1) -> OnnxGraph:
        for g in self.graphs:
            if g.batch == batch:
                return g
        raise BundleError(
            f"{self.root / BUNDLE_YAML}: no graph for batch {batch}; this bundle has batch sizes {list(self.batch_sizes)}"
        )

    def onnx_path(self, batch: int = 1) -> Path:
        return self.root / self.graph(batch).file

    def input_shape(self, batch: int = 1) -> Tuple[int, int, int, int]:
        return (batch,) + self.preprocess.input_shape

    def verify(self) -> None:
        """Re-hash every graph file; BundleError on a missing, truncated or tampered file."""
        for g in self.graphs:
            path = self.root / g.file
            if not path.is_file():
                raise BundleError(f"{path}: graph file listed in {BUNDLE_YAML} is missing; copy the whole bundle directory again")
            actual = sha256_file(path)
            if actual != g.sha256:
                raise BundleError(
                    f"{path}: SHA-256 {actual[:12]}... does not match {BUNDLE_YAML} graphs[batch={g.batch}].sha256 "
                    f"{g.sha256[:12]}... (truncated or modified copy); copy the bundle again or re-export it"
                )


def _require(meta: Dict[str, Any], key: str, yaml_path: Path) -> Any:
    if key not in meta:
        raise BundleError(f"{yaml_path}: missing field `{key}`; re-export the bundle with `daad-train export`")
    return meta[key]


def load_bundle(path: Union[str, Path], verify: bool = True) -> Bundle:
    """Read and validate a bundle directory (or its bundle.yaml)."""
    root = Path(path)
    if root.name == BUNDLE_YAML:
        root = root.parent
    yaml_path = root / BUNDLE_YAML
    if not root.exists():
        raise BundleError(f"{root}: bundle directory not found; pass the directory written by `daad-train export`")
    if not yaml_path.is_file():
        raise BundleError(f"{yaml_path}: not found; a bundle is a directory with {BUNDLE_YAML} and model.onnx")
    meta = read_yaml(yaml_path, BundleError, "the file is damaged, copy it again")
    if not isinstance(meta, dict):
        raise BundleError(f"{yaml_path}: expected a mapping at the top level; the file is damaged, copy it again")
    version = _require(meta, "format_version", yaml_path)
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{yaml_path}: format_version {version!r} is not supported (this daad-inspect reads "
            f"{BUNDLE_FORMAT_VERSION}); upgrade daad-inspect or re-export the bundle with this version"
        )
    try:
        spec = PreprocessSpec.from_dict(_require(meta, "preprocess", yaml_path))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{yaml_path}: field `preprocess` is invalid ({exc}); re-export the bundle") from exc
    raw_graphs = _require(meta, "graphs", yaml_path)
    try:
        graphs = tuple(OnnxGraph(file=str(g["file"]), sha256=str(g["sha256"]), batch=int(g["batch"])) for g in raw_graphs)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{yaml_path}: field `graphs` is invalid ({exc}); each entry needs file, sha256 and batch") from exc
    if not any(g.batch == 1 for g in graphs):
        raise BundleError(f"{yaml_path}: field `graphs` has no batch-1 graph; re-export the bundle")
    bundle = Bundle(
        root=root,
        name=str(meta.get("model", {}).get("name", root.name)),
        preprocess=spec,
        graphs=graphs,
        opset=int(meta.get("opset", 17)),
        score_stats=dict(meta.get("score_stats") or {}),
        metadata=meta,
    )
    if verify:
        bundle.verify()
    return bundle


def write_bundle_yaml(root: Union[str, Path], meta: Dict[str, Any]) -> Path:
    """Atomically write bundle.yaml (used by train.export)."""
    path = Path(root) / BUNDLE_YAML
    atomic_write_text(path, yaml.safe_dump(meta, sort_keys=False))
    return path


def describe(bundle: Bundle) -> str:
    """One line naming a bundle for logs."""
    return f"{bundle.name} ({bundle.sha256[:12]}, input {'x'.join(map(str, bundle.input_shape()))})"



def software_versions() -> Dict[str, str]:
    """Versions of what made a bundle or thresholds (provenance)."""
    import platform

    versions = {"python": platform.python_version()}
    for module in ("numpy", "torch", "onnx", "onnxruntime", "cv2"):
        # only modules the caller already loaded: importing torch here would cost seconds on a Jetson
        mod = sys.modules.get(module)
        if mod is not None:
            versions[module] = str(getattr(mod, "__version__", "?"))
    try:
        from importlib.metadata import version

        versions["daad-inspect"] = version("daad-inspect")
    except Exception:  # not installed as a distribution (running from a checkout)
        pass
    return versions


def write_bundle(
    root: Union[str, Path],
    name: str,
    preprocess: PreprocessSpec,
    graph_files: Dict[int, str],
    opset: int,
    model_config: Optional[Dict[str, Any]] = None,
    score_stats: Optional[Dict[str, Any]] = None,
    metrics: Optional[Dict[str, Any]] = None,
    training_data: Optional[Dict[str, Any]] = None,
) -> Bundle:
    """Hash the graph files already in `root` and write bundle.yaml; returns the loaded bundle."""
    from datetime import datetime, timezone

    root = Path(root)
    graphs = [
        {"file": file, "batch": int(batch), "sha256": sha256_file(root / file)} for batch, file in sorted(graph_files.items())
    ]
    meta: Dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": {"name": name, "config": model_config or {}},
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW"},
        "preprocess": preprocess.to_dict(),
        "outputs": {"anomaly_map": MAP_OUTPUT, "score": SCORE_OUTPUT},
        "opset": int(opset),
        "graphs": graphs,
        "score_stats": score_stats or {},
        "metrics": metrics or {},
        "training_data": training_data or {},
        "software": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bundle_yaml(root, meta)
    return load_bundle(root)
