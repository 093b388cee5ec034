"""Teach as good, on site: add the normal feature blocks of new frames to a bundle's memory (no torch).

    daad-calibrate teach --bundle B --images DIR --out B2
    daad-calibrate teach --bundle B --events ID [ID ...] --frames-dir /var/lib/daad-inspect/frames --out B2

A false alarm is taught by its event id: the agent names each saved frame `<time>_<camera>_<seq>_<event_id>.jpg`
(engine/saved_frames.py), and the taught bundle's provenance records the ids.

The bundle's features graph (bundle.yaml `features`, written by `daad-train export` for generator-free models)
turns each frame into the query vectors of each memory: (Q, D) rows, in the memory's own layout. They are
appended to that memory's initializers in model.onnx and in every batch graph (`<memory>.items_t` (D, N) and
`<memory>.half_sq_norms` (N), what the graph's nearest-item search reads), and a new bundle is written in a new
folder with a new manifest digest; bundle.yaml `taught` records the frames, when, and the parent bundle.

Over the memory's cap (the model config's memory_items / coarse_memory_items) the old items with the nearest
duplicate go first (`drop_near_duplicates`): the taught blocks are the new variation, every one is kept.

Reversible by keeping the parent: --out must be a new folder, the parent is never changed, and the agent's
config points back at it to undo. Thresholds are bound to a bundle's digest, so the taught bundle needs a
recalibration (`daad-calibrate capture` + `fit`) before the agent loads it.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.bundle import BUNDLE_YAML, Bundle, load_bundle, sha256_file, software_versions, write_bundle_yaml
from engine.errors import DaadError
from engine.preprocess import preprocess
from engine.saved_frames import event_id_of

from .capture import image_folder, read_image_files

logger = logging.getLogger(__name__)

ITEMS_SUFFIX = ".items_t"  # (D, N) initializer of a memory
NORMS_SUFFIX = ".half_sq_norms"  # (N,) initializer: |m|^2 / 2 per item
CAP_KEYS = {"block_memory": "memory_items", "coarse_memory": "coarse_memory_items"}  # model config key of each cap
DISTANCE_CHUNK = 1024  # rows per distance block: 1024 x 10 000 items x 4 B = 40 MB
MAX_TAUGHT_FRAMES = 10_000  # a folder larger than this is a training set: retrain on the desktop instead


class TeachError(DaadError):
    """The frames cannot be taught to this bundle (no features graph, a full memory, an unusable --out)."""


@dataclass
class MemoryChange:
    """What teaching did to one memory."""

    name: str
    before: int  # items
    offered: int  # blocks of the taught frames
    dropped: int  # old items removed to stay within the cap
    after: int
    cap: Optional[int]


@dataclass
class TeachResult:
    bundle: Bundle
    changes: List[MemoryChange]
    frames: List[str]
    skipped: List[str] = field(default_factory=list)
    seconds: float = 0.0


# -- pure functions ------------------------------------------------------------------------------
def nearest_other_distances(items: np.ndarray, among: np.ndarray, exclude_self: bool) -> Tuple[np.ndarray, np.ndarray]:
    """For each row of `items` (N, D): the squared distance to its nearest row of `among` (M, D), and that row's
    index; with exclude_self, `among` starts with `items` itself and row i is not its own neighbour."""
    a = among.astype(np.float32)
    a_norms = (a * a).sum(axis=1)
    dist = np.empty(len(items), dtype=np.float64)
    index = np.empty(len(items), dtype=np.int64)
    for start in range(0, len(items), DISTANCE_CHUNK):
        q = items[start:start + DISTANCE_CHUNK].astype(np.float32)
        d = a_norms[None, :] - 2.0 * (q @ a.T) + (q * q).sum(axis=1)[:, None]  # (chunk, M)
        if exclude_self:
            rows = np.arange(len(q))
            d[rows, start + rows] = np.inf
        j = d.argmin(axis=1)
        index[start:start + len(q)] = j
        dist[start:start + len(q)] = np.maximum(d[np.arange(len(q)), j], 0.0)
    return dist, index


def drop_near_duplicates(old: np.ndarray, new: np.ndarray, n_drop: int) -> np.ndarray:
    """Indices of `n_drop` rows of `old` (N, D) to remove so that old + new (M, D) fits a cap: those whose nearest
    other item (old or new) is closest, in ascending order of that distance; a removed item's nearest neighbour is
    then kept (it stands for both), so a close pair never loses both. Deterministic."""
    if n_drop <= 0:
        return np.zeros(0, dtype=np.int64)
    if n_drop > len(old):
        raise ValueError(f"cannot drop {n_drop} of {len(old)} items")
    dist, nearest = nearest_other_distances(old, np.concatenate([old, new]), exclude_self=True)
    order = np.lexsort((np.arange(len(old)), dist))
    kept = np.zeros(len(old), dtype=bool)  # protected: the neighbour of a dropped item
    dropped: List[int] = []
    for i in order.tolist():
        if kept[i]:
            continue
        dropped.append(i)
        if nearest[i] < len(old):
            kept[nearest[i]] = True
        if len(dropped) == n_drop:
            break
    if len(dropped) < n_drop:  # every pair protected one member: take the rest in order of distance
        taken = set(dropped)
        rest = [i for i in order.tolist() if i not in taken]
        dropped.extend(rest[: n_drop - len(dropped)])
    return np.sort(np.asarray(dropped, dtype=np.int64))


def merge_items(old: np.ndarray, new: np.ndarray, cap: Optional[int]) -> Tuple[np.ndarray, int]:
    """old (N, D) + new (M, D) -> (K, D) items within the cap (K <= cap), and how many old items were dropped."""
    if cap is not None and len(new) > cap:
        raise ValueError(f"{len(new)} new blocks exceed the memory's cap of {cap} items")
    n_drop = 0 if cap is None else max(0, len(old) + len(new) - cap)
    drop = drop_near_duplicates(old, new, n_drop)
    keep = np.setdiff1d(np.arange(len(old)), drop)
    return np.concatenate([old[keep], new]).astype(np.float32), n_drop


def half_sq_norms(items: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) |m|^2 / 2, as NearestBlockMemory.set_items stores them."""
    x = items.astype(np.float32)
    return (0.5 * (x * x).sum(axis=1)).astype(np.float32)


def frames_for_events(frames_dir: Union[str, Path], event_ids: Sequence[str]) -> List[Path]:
    """The agent's saved frame of each defect event id (a file `*_<event_id>.jpg` in `frames_dir`), in the ids'
    order; TeachError naming every id that is malformed or has no frame."""
    folder = Path(frames_dir)
    if not folder.is_dir():
        raise TeachError(f"{folder}: --frames-dir is not a folder; give the agent's frames.dir (agent.yaml)")
    wanted: List[str] = []
    for raw in event_ids:
        try:
            eid = str(uuid.UUID(raw.strip()))
        except ValueError:
            raise TeachError(f"{raw}: not an event id; copy `event_id` of the defect event (a UUID like "
                             "1b4e28ba-2fa1-11d2-883f-0016d3cca427)") from None
        if eid not in wanted:
            wanted.append(eid)
    by_id: Dict[str, List[Path]] = {}
    for p in folder.iterdir():
        frame_id = event_id_of(p)
        if frame_id is not None and p.is_file():
            by_id.setdefault(frame_id, []).append(p)
    missing = [e for e in wanted if e not in by_id]
    if missing:
        raise TeachError(f"{folder}: no saved frame for {len(missing)} of {len(wanted)} event id(s) "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the agent keeps its last "
                         "frames.max_files defective frames, so older ones are gone: teach those from an image folder "
                         "(--images), or check frames.dir")
    return [f for e in wanted for f in sorted(by_id[e])]


# -- graphs --------------------------------------------------------------------------------------
def memory_queries(bundle: Bundle, frames: Sequence[Tuple[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Run the features graph on each frame: memory name -> (frames x Q, D) query rows."""
    import onnxruntime as ort

    if bundle.features is None:
        raise TeachError(f"{bundle.root / BUNDLE_YAML}: no field `features`; re-export the bundle with `daad-train export`")
    session = ort.InferenceSession(str(bundle.root / bundle.features.file), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    names = list(bundle.features.outputs)
    rows: Dict[str, List[np.ndarray]] = {n: [] for n in names}
    for _, image in frames:
        outs = session.run([bundle.features.outputs[n] for n in names],
                           {input_name: preprocess(image, bundle.preprocess)[None]})
        for n, out in zip(names, outs):
            rows[n].append(np.asarray(out, dtype=np.float32))
    return {n: np.concatenate(v) for n, v in rows.items()}


def memory_items(graph_path: Path, name: str) -> np.ndarray:
    """(N, D) items of memory `name` in a graph file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_path))
    for init in model.graph.initializer:
        if init.name == name + ITEMS_SUFFIX:
            return numpy_helper.to_array(init).T.copy()
    raise TeachError(f"{graph_path}: no initializer `{name}{ITEMS_SUFFIX}`; this graph's memory cannot be taught: "
                     "re-export the bundle with `daad-train export`")


def replace_memories(src: Path, dst: Path, items: Dict[str, np.ndarray]) -> None:
    """Copy graph `src` to `dst` with each memory's items_t / half_sq_norms replaced ((N, D) rows per memory)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    wanted = {}
    for name, rows in items.items():
        wanted[name + ITEMS_SUFFIX] = np.ascontiguousarray(rows.T.astype(np.float32))
        wanted[name + NORMS_SUFFIX] = half_sq_norms(rows)
    found = set()
    for i, init in enumerate(graph.initializer):
        if init.name in wanted:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(wanted[init.name], init.name))
            found.add(init.name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise TeachError(f"{src}: no initializer `{missing[0]}`; re-export the bundle with `daad-train export`")
    del graph.value_info[:]  # shapes computed for the old item count; ONNX Runtime and TensorRT infer them again
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(dst))


# -- the command ---------------------------------------------------------------------------------
def teach_bundle(bundle_dir: Union[str, Path], images: Union[str, Path, Sequence[Path]], out: Union[str, Path],
                 events: Optional[Sequence[str]] = None) -> TeachResult:
    """Teach the frames of `images` (a folder, or a list of image files) to the bundle at `bundle_dir`; the taught
    bundle is written to `out` (new). `events`: the defect event ids the frames were found by (provenance)."""
    t0 = time.perf_counter()
    parent = load_bundle(bundle_dir)
    out = Path(out)
    if parent.features is None:
        raise TeachError(f"{parent.root / BUNDLE_YAML}: no field `features` (a features graph): this bundle cannot be "
                         "taught on site; re-export it with `daad-train export` from a generator-free model (inspect)")
    if out.exists() and (out.resolve() == parent.root.resolve() or any(out.iterdir())):
        raise TeachError(f"{out}: --out exists and is not empty; give a new folder (the bundle taught from is kept "
                         "unchanged, so the agent can go back to it)")
    files = image_folder(images) if isinstance(images, (str, Path)) else list(images)
    where = str(images) if isinstance(images, (str, Path)) else str(Path(files[0]).parent) if files else "--events"
    if len(files) > MAX_TAUGHT_FRAMES:
        raise TeachError(f"{where}: {len(files)} images; teach at most {MAX_TAUGHT_FRAMES} frames, or retrain on "
                         "the desktop with `daad-train fit`")
    skipped: List[str] = []
    frames = list(read_image_files(files, skipped))
    if not frames:
        raise TeachError(f"{where}: none of the {len(files)} images could be read")
    queries = memory_queries(parent, frames)
    config = (parent.metadata.get("model") or {}).get("config") or {}
    merged: Dict[str, np.ndarray] = {}
    changes: List[MemoryChange] = []
    for name, new in queries.items():
        old = memory_items(parent.onnx_path(1), name)
        if old.shape[1] != new.shape[1]:
            raise TeachError(f"{parent.root / parent.features.file}: output for `{name}` has {new.shape[1]} values per "
                             f"block, the memory {old.shape[1]}; re-export the bundle with `daad-train export`")
        cap_value = config.get(CAP_KEYS.get(name, ""))
        cap = int(cap_value) if cap_value else None
        try:
            merged[name], dropped = merge_items(old, new, cap)
        except ValueError as exc:
            raise TeachError(f"{where}: {exc} (bundle.yaml model.config.{CAP_KEYS.get(name)}); teach fewer "
                             "frames, or retrain on the desktop with `daad-train fit`") from None
        changes.append(MemoryChange(name=name, before=len(old), offered=len(new), dropped=dropped,
                                    after=len(merged[name]), cap=cap))
        logger.info("%s: %d items + %d taught blocks - %d near duplicates = %d (cap %s)", name, len(old), len(new),
                    dropped, len(merged[name]), cap)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = dict(parent.metadata)
        graphs = []
        for g in parent.graphs:
            replace_memories(parent.root / g.file, staging / g.file, merged)
            graphs.append({"file": g.file, "batch": g.batch, "sha256": sha256_file(staging / g.file)})
        shutil.copy2(parent.root / parent.features.file, staging / parent.features.file)
        meta["graphs"] = graphs
        meta["taught"] = list(parent.metadata.get("taught") or []) + [_provenance(parent, frames, changes, skipped,
                                                                                   events)]
        meta["software"] = software_versions()
        meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta.pop("parity", None)  # measured against the parent's PyTorch model; not this memory's
        write_bundle_yaml(staging, meta)
        load_bundle(staging)  # verify before publishing
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TeachResult(bundle=load_bundle(out), changes=changes, frames=[n for n, _ in frames], skipped=skipped,
                       seconds=time.perf_counter() - t0)


def _provenance(parent: Bundle, frames: Sequence[Tuple[str, np.ndarray]], changes: List[MemoryChange],
                skipped: List[str], events: Optional[Sequence[str]]) -> Dict[str, Any]:
    record: Dict[str, Any] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent": {"name": parent.name, "sha256": parent.sha256, "path": str(parent.root.resolve())},
        "frames": [{"file": str(Path(n).resolve()), "sha256": sha256_file(n)} for n, _ in frames],
        "skipped": list(skipped),
        "memories": {c.name: {"before": c.before, "taught_blocks": c.offered, "dropped": c.dropped, "after": c.after,
                              "cap": c.cap} for c in changes},
        "cap_rule": "over the cap, the old items with the nearest duplicate are dropped; taught blocks are kept",
    }
    if events is not None:
        record["events"] = list(events)
    return record


def summary_lines(result: TeachResult) -> List[str]:
    b = result.bundle
    lines = [f"taught {len(result.frames)} frame(s) to {b.name}: {b.root} ({b.sha256[:12]}), {result.seconds:.1f} s"]
    for c in result.changes:
        lines.append(f"  {c.name:<14} {c.before} items + {c.offered} taught blocks - {c.dropped} near duplicates "
                     f"= {c.after}" + ("" if c.cap is None else f" (cap {c.cap})"))
    if result.skipped:
        lines.append(f"  {len(result.skipped)} unreadable image(s) skipped")
    parent = b.metadata["taught"][-1]["parent"]
    lines.append(f"the bundle taught from is unchanged: {parent['path']} ({parent['sha256'][:12]}); point the agent "
                 "back at it to undo: "
                 f"daad-calibrate undo --bundle {b.root} --config AGENT_YAML")
    lines.append(f"next: recalibrate for the new bundle (thresholds bind to it): daad-calibrate capture --bundle {b.root} "
                 "... then daad-calibrate fit")
    return lines
