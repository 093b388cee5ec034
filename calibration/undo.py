"""Undo a teach: back to the bundle a taught bundle was taught from (bundle.yaml `taught[-1].parent`).

    daad-calibrate undo --bundle B2                              # prints the parent, verified
    daad-calibrate undo --bundle B2 --config /etc/daad-inspect/agent.yaml   # and points the agent back at it

The parent must still be where teaching found it and still have the digest it had then (its manifest: a changed
file, or another bundle copied there, is refused). With --config the agent config's `model.bundle` line is
rewritten in place (the file's other lines and comments unchanged, written atomically, its mode kept); the config
must point at the taught bundle now. Thresholds bind to a bundle's digest, so the agent then needs the parent's own
thresholds.yaml back (or a new calibration): said, and checked where the config's thresholds file can be read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import yaml

from engine.bundle import BUNDLE_YAML, Bundle, atomic_write_text, load_bundle
from engine.errors import DaadError


class UndoError(DaadError):
    """The taught bundle's parent cannot be gone back to (not a taught bundle, parent moved or changed)."""


@dataclass
class UndoResult:
    taught: Bundle
    parent: Bundle
    config: Optional[Path] = None  # the agent config rewritten, if any
    previous: Optional[str] = None  # its model.bundle before
    thresholds_for: str = ""  # "parent", "taught", "other" or "" (unknown): what the config's thresholds.yaml binds to
    thresholds_path: Optional[Path] = None


def parent_of(taught: Bundle) -> Bundle:
    """The bundle `taught` was taught from, loaded and checked against the digest teaching recorded."""
    records = taught.metadata.get("taught")
    where = f"{taught.root / BUNDLE_YAML}"
    if not records:
        raise UndoError(f"{where}: no field `taught`: this bundle was not made by `daad-calibrate teach`, so there is "
                        "nothing to undo (point the agent at the bundle you want instead)")
    record = records[-1] if isinstance(records, list) else None
    parent = record.get("parent") if isinstance(record, dict) else None
    if not isinstance(parent, dict) or not parent.get("path") or not parent.get("sha256"):
        raise UndoError(f"{where}: field `taught[-1].parent` lacks path or sha256; the bundle was edited by hand: "
                        "point the agent at the bundle taught from yourself")
    path = Path(str(parent["path"]))
    if not (path / BUNDLE_YAML).is_file():
        raise UndoError(f"{where}: the bundle taught from, `taught[-1].parent.path` {path}, is not there any more "
                        f"({BUNDLE_YAML} missing); restore it from your copy of {parent.get('name', 'that bundle')} "
                        f"(sha256 {str(parent['sha256'])[:12]}...)")
    try:
        bundle = load_bundle(path)
    except DaadError as exc:
        raise UndoError(f"{where}: the bundle taught from ({path}) does not load: {exc}") from None
    if bundle.sha256 != parent["sha256"]:
        raise UndoError(f"{where}: the bundle at `taught[-1].parent.path` {path} is {bundle.sha256[:12]}..., teaching "
                        f"recorded {str(parent['sha256'])[:12]}...; it was replaced or changed since: restore the "
                        "original bundle there, or point the agent at a copy of it yourself")
    return bundle


MODEL_KEY = re.compile(r"^model\s*:\s*(#.*)?$")
BUNDLE_KEY = re.compile(r"^(?P<indent>[ \t]+)bundle(?P<colon>\s*:\s*)(?P<value>[^#\n]*?)(?P<rest>\s*(#.*)?)$")
TOP_LEVEL = re.compile(r"^[^\s#]")


def rewrite_bundle_line(text: str, new_path: str) -> Optional[str]:
    """`text` (an agent config) with the value of `model.bundle` (block style, its own line) replaced by `new_path`,
    everything else unchanged; None when there is no such line (flow style, an anchor, ...)."""
    lines = text.splitlines(keepends=True)
    in_model = False
    for i, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if TOP_LEVEL.match(body):
            in_model = bool(MODEL_KEY.match(body))
            continue
        m = BUNDLE_KEY.match(body) if in_model else None
        if m:
            value = yaml.safe_dump(new_path, default_style=None, width=10_000).strip()
            if value.endswith("\n...") or value.endswith("..."):
                value = value.rsplit("\n", 1)[0].strip()
            lines[i] = f"{m['indent']}bundle{m['colon']}{value}{m['rest']}{line[len(body):]}"
            return "".join(lines)
    return None


def _config_value(raw: Any, *keys: str) -> Any:
    for k in keys:
        raw = raw.get(k) if isinstance(raw, dict) else None
    return raw


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def point_config_back(config: Path, taught: Bundle, parent: Bundle) -> UndoResult:
    """Rewrite the agent config's model.bundle from the taught bundle to its parent."""
    try:
        text = config.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except FileNotFoundError:
        raise UndoError(f"{config}: no such agent config; give the file the agent runs with (--config)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UndoError(f"{config}: cannot read it as YAML ({exc.__class__.__name__}); fix the file, or drop "
                        "--config and edit model.bundle yourself") from None
    current = _config_value(raw, "model", "bundle")
    if not isinstance(current, str) or not current.strip():
        raise UndoError(f"{config}: field `model.bundle` is missing; expected the taught bundle's path {taught.root}")
    if "${" in current:
        raise UndoError(f"{config}: field `model.bundle` is `{current}` (from the environment); set it to "
                        f"{parent.root} yourself")
    base = config.resolve().parent
    now = (base / current) if not Path(current).is_absolute() else Path(current)
    if _same(now, parent.root):
        raise UndoError(f"{config}: field `model.bundle` already points at the bundle taught from ({current}); "
                        "nothing to undo")
    if not _same(now, taught.root):
        raise UndoError(f"{config}: field `model.bundle` is {current}, not the taught bundle {taught.root}; this "
                        "config does not run it, so it is left unchanged (give the config that does, or edit it)")
    new_text = rewrite_bundle_line(text, str(parent.root))
    if new_text is None:
        raise UndoError(f"{config}: field `model.bundle` is not on its own `bundle: PATH` line under `model:`; set "
                        f"it to {parent.root} yourself")
    if _config_value(yaml.safe_load(new_text), "model", "bundle") != str(parent.root):
        raise UndoError(f"{config}: field `model.bundle` could not be rewritten safely; set it to {parent.root} yourself")
    atomic_write_text(config, new_text, keep_mode=True)
    result = UndoResult(taught=taught, parent=parent, config=config, previous=current)
    thresholds = _config_value(raw, "thresholds", "path")
    if isinstance(thresholds, str) and "${" not in thresholds:
        path = Path(thresholds) if Path(thresholds).is_absolute() else base / thresholds
        result.thresholds_path = path
        result.thresholds_for = _bound_to(path, taught, parent)
    return result


def _bound_to(path: Path, taught: Bundle, parent: Bundle) -> str:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    recorded = data.get("bundle_sha256") if isinstance(data, dict) else None
    if not isinstance(recorded, str):
        return ""
    if parent.binding(recorded):
        return "parent"
    return "taught" if taught.binding(recorded) else "other"


def undo(bundle_dir: Union[str, Path], config: Optional[Union[str, Path]] = None) -> UndoResult:
    taught = load_bundle(bundle_dir)
    parent = parent_of(taught)
    if config is None:
        return UndoResult(taught=taught, parent=parent)
    return point_config_back(Path(config), taught, parent)


def summary_lines(result: UndoResult) -> List[str]:
    p, t = result.parent, result.taught
    lines = [f"{t.root} was taught from {p.root} ({p.name}, {p.sha256[:12]}): there, unchanged"]
    if result.config is None:
        lines.append(f"to undo: set model.bundle in the agent config to {p.root} (or run again with --config "
                     "AGENT_YAML), put back the thresholds made for it, and reload the agent")
        return lines
    lines.append(f"{result.config}: model.bundle {result.previous} -> {p.root}")
    th = result.thresholds_path
    if result.thresholds_for == "parent":
        lines.append(f"thresholds {th} are made for {p.name} ({p.sha256[:12]}): restart the agent "
                     "(systemctl restart daad-agent)")
    else:
        which = {"taught": "made for the taught bundle", "other": "made for another bundle",
                 "": "not readable here"}[result.thresholds_for]
        lines.append(f"thresholds {th} are {which}: the agent refuses them for {p.name}; put back the thresholds.yaml "
                     f"made for it ({p.sha256[:12]}) or recalibrate (daad-calibrate capture --config {result.config} "
                     "... then fit), then restart the agent")
    return lines
