"""The model bundle: a self-describing directory (model.onnx + bundle.yaml) that travels
from the desktop to the Jetson. train/ writes it (train.export), everything else reads it here.

Integrity: bundle.yaml ends with `manifest_sha256`, one digest over every other byte of bundle.yaml and
over every graph file, so an edited preprocessing mean or input size is refused at load just like a
modified graph. The manifest is the bundle's identity: thresholds and calibration captures bind to it.
Bundles written before manifests still load, with a warning, identified by their batch-1 graph's hash.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import Field, model_validator
from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from .errors import BundleError
from .onnx_io import ELEM_FLOAT, read_graph_io
from .preprocess import CHANNEL_ORDERS, RESIZE_MODES, PreprocessSpec
from .validation import StrictModel, Text, read_yaml, show, validate

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
BUNDLE_YAML = "bundle.yaml"
INPUT_NAME = "image"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"
HASH_CHUNK = 1 << 20
MANIFEST_FIELD = "manifest_sha256"
MANIFEST_DOMAIN = b"daad-bundle-manifest/1\n"  # versions the digest's recipe, not the bundle format
# The manifest line, wherever a YAML tool may have moved it; the digest covers every other byte.
_MANIFEST_LINE = re.compile(rb"^manifest_sha256:[ \t]*['\"]?([0-9a-f]{64})['\"]?[ \t]*(?:\r?\n|\Z)", re.M)
EXPORT_FIX = "re-export the bundle with `daad-train export`"
COPY_OR_EXPORT = f"copy the bundle again or {EXPORT_FIX}"
FEATURES_FILE = "features.onnx"  # image -> each memory's query vectors (daad-calibrate teach adds them to the memory)


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Union[str, Path], data: bytes, keep_mode: bool = False) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target. With keep_mode, the
    replaced file's permission bits and owner carry over (a config may be 0640 root:daad)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_mode:
            _copy_mode_and_owner(target, tmp)
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


def _copy_mode_and_owner(source: Path, dest: str) -> None:
    st = source.stat()
    os.chmod(dest, st.st_mode & 0o7777)
    try:
        os.chown(dest, st.st_uid, st.st_gid)
    except OSError:
        pass  # not root: the file stays ours, as any edit by this user would leave it


def atomic_write_text(path: Union[str, Path], text: str, keep_mode: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), keep_mode)


@dataclass(frozen=True)
class OnnxGraph:
    """One exported graph of the bundle, at one fixed batch size."""

    file: str
    sha256: str
    batch: int


@dataclass(frozen=True)
class FeaturesGraph:
    """bundle.yaml `features`: a graph from the input image to the query vectors of each memory of model.onnx
    (generator-free models only). `outputs` maps a memory's initializer prefix (e.g. "block_memory", whose items
    are the initializers block_memory.items_t and block_memory.half_sq_norms) to the output holding its queries
    (Q, D) for one image."""

    file: str
    sha256: str
    outputs: Dict[str, str]


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
    manifest_sha256: str = ""  # "" for a bundle written before manifests
    features: Optional[FeaturesGraph] = None  # bundles of generator-free models exported since issue 37

    @property
    def sha256(self) -> str:
        """Identity of the bundle (thresholds and captures bind to it): the manifest digest over bundle.yaml
        and every graph; for a bundle written before manifests, the hash of its batch-1 graph.
        TensorRT plans are keyed by the graph's own hash (`graph(batch).sha256`)."""
        return self.manifest_sha256 or self.graph(1).sha256

    @property
    def graph_sha256(self) -> str:
        return self.graph(1).sha256

    def binding(self, recorded: str) -> str:
        """How a file that names `recorded` as its bundle hash is bound to this bundle: "manifest" (to all of
        it), "graph" (to its batch-1 graph only: written before manifests), or "" (another bundle)."""
        if recorded == self.sha256:
            return "manifest" if self.manifest_sha256 else "graph"
        if self.manifest_sha256 and recorded == self.graph_sha256:
            return "graph"
        return ""

    @property
    def input_name(self) -> str:
        return str((self.metadata.get("input") or {}).get("name", INPUT_NAME))

    @property
    def map_output(self) -> str:
        return str((self.metadata.get("outputs") or {}).get("anomaly_map", MAP_OUTPUT))

    @property
    def score_output(self) -> str:
        return str((self.metadata.get("outputs") or {}).get("score", SCORE_OUTPUT))

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
        """Re-hash every graph file and the manifest, then check each graph's inputs and outputs against
        bundle.yaml; BundleError, in one line, on a missing, truncated, tampered or inconsistent file."""
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
        if self.features is not None:
            path = self.root / self.features.file
            if not path.is_file():
                raise BundleError(f"{path}: features graph listed in {BUNDLE_YAML} is missing; copy the whole bundle "
                                  "directory again")
            actual = sha256_file(path)
            if actual != self.features.sha256:
                raise BundleError(f"{path}: SHA-256 {actual[:12]}... does not match {BUNDLE_YAML} features.sha256 "
                                  f"{self.features.sha256[:12]}... (truncated or modified copy); copy the bundle again")
        self.verify_manifest()
        for g in self.graphs:
            check_graph_matches(self, g)

    def hashed_files(self) -> Dict[str, str]:
        """Every file the manifest covers besides bundle.yaml, by name: the graphs and the features graph."""
        files = {g.file: g.sha256 for g in self.graphs}
        if self.features is not None:
            files[self.features.file] = self.features.sha256
        return files

    def verify_manifest(self) -> None:
        yaml_path = self.root / BUNDLE_YAML
        raw = yaml_path.read_bytes()
        found = list(_MANIFEST_LINE.finditer(raw))
        if not found:
            if self.manifest_sha256 or MANIFEST_FIELD in self.metadata:
                raise BundleError(f"{yaml_path}: field `{MANIFEST_FIELD}` is not a line of its own with 64 hex digits "
                                  f"(edited by hand?); copy the bundle again or {EXPORT_FIX}")
            logger.warning("%s: no field `%s` (written before bundle manifests): edits to bundle.yaml cannot be "
                           "detected; %s", yaml_path, MANIFEST_FIELD, EXPORT_FIX)
            return
        if len(found) > 1 or found[0].group(1).decode() != self.manifest_sha256:
            raise BundleError(f"{yaml_path}: field `{MANIFEST_FIELD}` appears {len(found)} times or disagrees with the "
                              f"parsed file; copy the bundle again or {EXPORT_FIX}")
        body = raw[:found[0].start()] + raw[found[0].end():]
        actual = manifest_digest(body, self.hashed_files())
        if actual != self.manifest_sha256:
            raise BundleError(
                f"{yaml_path}: field `{MANIFEST_FIELD}` {self.manifest_sha256[:12]}... does not match the content of "
                f"{BUNDLE_YAML} and its graphs ({actual[:12]}...): the bundle was edited or damaged after export; "
                f"copy the bundle again or {EXPORT_FIX}"
            )


def manifest_digest(yaml_body: bytes, graph_sha256: Dict[str, str]) -> str:
    """SHA-256 over bundle.yaml without its manifest line and over each graph's (verified) hash by file name."""
    digest = hashlib.sha256(MANIFEST_DOMAIN)
    digest.update(hashlib.sha256(yaml_body).digest())
    for file in sorted(graph_sha256):
        digest.update(f"{file}\0{graph_sha256[file]}\n".encode("utf-8"))
    return digest.hexdigest()


def check_graph_matches(bundle: Bundle, g: OnnxGraph) -> None:
    """The graph's input (name, dtype, shape) and outputs (names) are what bundle.yaml says; else one line."""
    path = bundle.root / g.file
    yaml_path = bundle.root / BUNDLE_YAML
    try:
        io = read_graph_io(path)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable ONNX model ({exc}); copy the bundle again or {EXPORT_FIX}") from exc
    inp = io.input(bundle.input_name)
    if inp is None:
        raise BundleError(f"{yaml_path}: field `input.name` is {bundle.input_name!r} but {g.file} has inputs "
                          f"{[t.name for t in io.inputs]}; {EXPORT_FIX}")
    if inp.elem_type != ELEM_FLOAT:
        raise BundleError(f"{yaml_path}: field `input.dtype` is float32 but {g.file} takes {inp.dtype}; {EXPORT_FIX}")
    expected = bundle.input_shape(g.batch)
    # a dynamic dim (None) is not a disagreement here: `daad-engine check` names it for TensorRT
    if inp.shape is not None and (len(inp.shape) != len(expected)
                                  or any(d is not None and d != e for d, e in zip(inp.shape, expected))):
        spec = bundle.preprocess
        got = "x".join("?" if d is None else str(d) for d in inp.shape)
        raise BundleError(
            f"{yaml_path}: field `preprocess` ({spec.channel_order}, {spec.height}x{spec.width}, batch {g.batch}: "
            f"{'x'.join(map(str, expected))}) does not match {g.file}, whose input {inp.name!r} is {got}; {EXPORT_FIX}"
        )
    names = [t.name for t in io.outputs]
    for key, name in (("anomaly_map", bundle.map_output), ("score", bundle.score_output)):
        if name not in names:
            raise BundleError(f"{yaml_path}: field `outputs.{key}` is {name!r} but {g.file} has outputs {names}; "
                              f"{EXPORT_FIX}")


# -- bundle.yaml's schema: every key a writer has put there (write_bundle, train.export's parity, calibration.teach's
# taught); another key is damage (a flipped byte in a key would otherwise make the manifest line look absent) or a
# hand edit. Sections a tool fills freely (model.config, score_stats, metrics, ...) are mappings, free inside.
Free = Dict[Any, Any]


class BundleModelSection(StrictModel):
    name: Optional[Text] = None  # None: the bundle directory's name
    config: Free = {}  # train.config.ModelConfig as a mapping (or {"views": [...]} for an ensemble)


class BundleInputSection(StrictModel):
    name: Text = INPUT_NAME
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"


class BundleOutputsSection(StrictModel):
    anomaly_map: Text = MAP_OUTPUT
    score: Text = SCORE_OUTPUT


class BundlePreprocessSection(StrictModel):
    height: Annotated[int, Field(ge=8)]
    width: Annotated[int, Field(ge=8)]
    channel_order: Literal[CHANNEL_ORDERS] = "gray"  # type: ignore[valid-type]
    mean: List[float] = [0.5]
    std: List[float] = [0.5]
    resize: Literal[RESIZE_MODES] = "stretch"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> "BundlePreprocessSection":
        channels = 1 if self.channel_order == "gray" else 3
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std: got {len(self.mean)} and {len(self.std)} values, expected {channels} each "
                             f"for channel_order {self.channel_order!r}")
        return self

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(height=self.height, width=self.width, channel_order=self.channel_order,
                              mean=tuple(self.mean), std=tuple(self.std), resize=self.resize)


class BundleGraphEntry(StrictModel):
    file: Text
    sha256: Text
    batch: Annotated[int, Field(ge=1)]


class BundleFeaturesEntry(StrictModel):
    file: Text
    sha256: Text
    outputs: Dict[Text, Text]  # memory prefix -> output name


class BundleFile(StrictModel):
    """bundle.yaml."""

    format_version: Literal[1]  # checked first, with its own fix (load_bundle)
    model: BundleModelSection = BundleModelSection()
    input: BundleInputSection = BundleInputSection()
    preprocess: BundlePreprocessSection
    outputs: BundleOutputsSection = BundleOutputsSection()
    opset: Annotated[int, Field(ge=1)] = 17
    graphs: Annotated[List[BundleGraphEntry], Field(min_length=1)]
    score_stats: Free = {}
    metrics: Free = {}
    training_data: Free = {}
    software: Free = {}
    created: Text = ""
    parity: Optional[Free] = None  # ONNX Runtime against PyTorch at export (train.export)
    features: Optional[BundleFeaturesEntry] = None  # bundles of generator-free models exported since issue 37
    taught: List[Free] = []  # one record per `daad-calibrate teach` (calibration.teach): free inside
    manifest_sha256: Optional[Text] = None  # checked against the bytes by Bundle.verify_manifest


BUNDLE_FIELDS = frozenset(BundleFile.model_fields)  # every top-level key a bundle has been written with


def parse_bundle_yaml(meta: Any, yaml_path: Path) -> BundleFile:
    """bundle.yaml's mapping, checked; BundleError with one line per problem
    (`bundle.yaml: key.path: got X, expected Y; copy the bundle again or re-export ...`)."""
    if isinstance(meta, dict) and meta.get("format_version") != BUNDLE_FORMAT_VERSION:
        if "format_version" not in meta:
            raise BundleError(f"{yaml_path}: format_version: got nothing, expected {BUNDLE_FORMAT_VERSION}; "
                              f"{COPY_OR_EXPORT}")
        raise BundleError(f"{yaml_path}: format_version: got {show(meta['format_version'])}, expected "
                          f"{BUNDLE_FORMAT_VERSION} (the format this daad-inspect reads); upgrade daad-inspect or "
                          "re-export the bundle with this version")
    parsed = validate(BundleFile, meta, str(yaml_path), BundleError, COPY_OR_EXPORT)
    batches = [g.batch for g in parsed.graphs]
    if 1 not in batches:
        raise BundleError(f"{yaml_path}: graphs: got batch sizes {batches}, expected a batch-1 graph among them; "
                          f"{EXPORT_FIX}")
    return parsed


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
    parsed = parse_bundle_yaml(meta, yaml_path)
    features = parsed.features
    bundle = Bundle(
        features=None if features is None else FeaturesGraph(file=features.file, sha256=features.sha256,
                                                            outputs=dict(features.outputs)),
        root=root,
        name=parsed.model.name if parsed.model.name is not None else root.name,
        preprocess=parsed.preprocess.spec(),
        graphs=tuple(OnnxGraph(file=g.file, sha256=g.sha256, batch=g.batch) for g in parsed.graphs),
        opset=parsed.opset,
        score_stats=dict(parsed.score_stats),
        metadata=meta,
        manifest_sha256=parsed.manifest_sha256 or "",
    )
    if verify:
        bundle.verify()
    return bundle


def write_bundle_yaml(root: Union[str, Path], meta: Dict[str, Any]) -> Path:
    """Atomically write bundle.yaml sealed with its manifest (used by train.export): the graphs it lists
    must already be in `root`; any earlier manifest in `meta` is replaced."""
    root = Path(root)
    path = root / BUNDLE_YAML
    body = {k: v for k, v in meta.items() if k != MANIFEST_FIELD}
    text = yaml.safe_dump(body, sort_keys=False)
    graph_sha256 = {}
    for g in list(body.get("graphs") or []) + ([body["features"]] if body.get("features") else []):
        actual = sha256_file(root / str(g["file"]))
        if actual != g.get("sha256"):
            raise BundleError(f"{root / str(g['file'])}: SHA-256 differs from the graphs[].sha256 being written; "
                              "hash the graph files after they are final")
        graph_sha256[str(g["file"])] = actual
    digest = manifest_digest(text.encode("utf-8"), graph_sha256)
    atomic_write_text(path, f"{text}{MANIFEST_FIELD}: {digest}\n")
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
    features_outputs: Optional[Dict[str, str]] = None,
) -> Bundle:
    """Hash the graph files already in `root` and write bundle.yaml; returns the loaded bundle. With
    features_outputs (memory prefix -> output name), `root` also holds FEATURES_FILE (FeaturesGraph)."""
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
    if features_outputs:
        meta["features"] = {"file": FEATURES_FILE, "sha256": sha256_file(root / FEATURES_FILE),
                            "outputs": dict(features_outputs)}
    write_bundle_yaml(root, meta)
    return load_bundle(root)
