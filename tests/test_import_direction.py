"""Imports point down (design contract §7): engine/ at the bottom; camera/ on it; agent/ and calibration/ on both,
side by side; train/ on engine/ only. Read from the source (every import, lazy ones inside functions, relative
ones and importlib.import_module("...") with a literal name included), not from sys.modules, so an import on a
path no test exercises is caught too."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
# what each package may import of the others; nothing else of this repository (scripts, tests, benchmarks)
ALLOWED: Dict[str, Set[str]] = {
    "engine": set(),
    "camera": {"engine"},
    "agent": {"engine", "camera"},
    "calibration": {"engine", "camera"},
    "train": {"engine"},
}
PACKAGES = tuple(ALLOWED)
CONSUMERS = ("scripts", "tests", "benchmarks")  # on top of everything; no package imports them


def _absolute(node: ast.ImportFrom, path: Path) -> Optional[str]:
    """`from ..x import y` in a/b/c.py -> a.x; None when it climbs out of the repository."""
    if node.level == 0:
        return node.module
    parts = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]  # the file's package
    if node.level - 1 > len(parts) - 1:
        return None
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, text: Optional[str] = None) -> Iterator[Tuple[str, int]]:
    """(absolute module name, line) of every import in a file (or in `text` as if it were that file): `import`,
    `from` (relative ones resolved) and importlib.import_module / __import__ with a literal name."""
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            yield (module if module is not None else "." * node.level + (node.module or "")), node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.args[0].value, node.lineno


def test_every_top_level_package_has_a_layer() -> None:
    """A new package must say where it stands (and so what it may import)."""
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert found - set(PACKAGES) - set(CONSUMERS) == set()


def test_the_layers_have_no_cycle() -> None:
    def reaches(start: str, goal: str, seen: Set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in ALLOWED[start])

    assert [p for p in PACKAGES if reaches(p, p, set())] == []


def test_every_import_between_packages_points_down() -> None:
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            for module, line in imports(path):
                target = module.split(".")[0]
                if module.startswith("."):
                    wrong.append(f"{where}:{line} imports {module} (above the repository root)")
                elif (target in PACKAGES or target in CONSUMERS) and target != package and target not in ALLOWED[package]:
                    wrong.append(f"{where}:{line} imports {module}")
    assert wrong == [], "\n".join(wrong)


def test_the_check_sees_lazy_relative_and_dynamic_imports() -> None:
    # the walker itself: an import it cannot see is one it cannot refuse
    text = ("def f():\n    from agent import app\n    from ..tests import x\n    from .regions import y\n"
            "    import importlib\n    importlib.import_module('calibration.fit')\n")
    found = {m for m, _ in imports(ROOT / "engine" / "scoring.py", text)}
    assert found == {"agent", "..tests", "engine.regions", "importlib", "calibration.fit"}  # ..: flagged as above the root


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
