"""Imports point down (design contract §7): engine/ at the bottom; agent/ and calibration/ on it, side by side;
train/ on engine/ only. Read from the source (every import, lazy ones inside functions included), not from
sys.modules, so an import on a path no test exercises is caught too."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "agent", "calibration", "train")
# what each package may import of the others
ALLOWED: Dict[str, Set[str]] = {"engine": set(), "agent": {"engine"}, "calibration": {"engine"}, "train": {"engine"}}
# Still sideways, lazily: `daad-calibrate capture --config agent.yaml` reads the agent's camera section and opens its
# camera. The camera sources and their config belong in a camera package both use (issue 35); until then this one
# module, and only these two agent modules, are the exception. agent/ imports nothing of calibration/.
SIDEWAYS = {("calibration/capture.py", "agent.config"), ("calibration/capture.py", "agent.sources")}


def imports(path: Path) -> Iterator[Tuple[str, int]]:
    """(absolute module name, line) of every import in a file; relative ones stay in their package."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def test_every_import_between_packages_points_down() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for module, line in imports(path):
                target = module.split(".")[0]
                if target in PACKAGES and target != package and target not in ALLOWED[package]:
                    if (where, ".".join(module.split(".")[:2])) not in SIDEWAYS:
                        wrong.append(f"{where}:{line} imports {module}")
    assert wrong == [], "\n".join(wrong)


def test_the_known_sideways_imports_are_still_needed() -> None:
    # when capture stops needing the agent, this list (and the exception above) must go
    found = {(p, ".".join(m.split(".")[:2])) for p in {p for p, _ in SIDEWAYS}
             for m, _ in imports(ROOT / p)}
    assert SIDEWAYS <= found


def public_names(package: str) -> Dict[str, str]:
    """Public classes and module-level type aliases of a package -> the file that defines them."""
    names: Dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                names[node.name] = path.relative_to(ROOT).as_posix()
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and node.targets[0].id[:1].isupper() and not node.targets[0].id.isupper()
                  and isinstance(node.value, ast.Subscript)):  # `Scorer = Union[...]`
                names[node.targets[0].id] = path.relative_to(ROOT).as_posix()
    return names


def test_no_public_class_name_is_used_in_two_packages() -> None:
    seen: Dict[str, str] = {}
    twice = []
    for package in PACKAGES:
        for name, where in public_names(package).items():
            if name in seen:
                twice.append(f"{name}: {seen[name]} and {where}")
            seen.setdefault(name, where)
    assert twice == [], "\n".join(twice)
