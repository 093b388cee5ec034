"""The README is for users: short, and every command and link in it is real."""
from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODULES = {"daad-train": "train", "daad-engine": "engine", "daad-calibrate": "calibration", "daad-agent": "agent"}
MAX_LINES = 300


def commands() -> List[str]:
    """Every command line in the README: lines of its bash blocks, and `inline` spans that start with a tool."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    lines += re.findall(r"`((?:daad-\w+|make|python|torchrun) [^`]+)`", README)
    return lines


def tool_calls() -> List[Tuple[str, str, List[str]]]:
    """(tool, subcommand or '', its --flags) of every daad-* command."""
    calls = []
    for line in commands():
        for match in re.finditer(r"(daad-\w+)((?: [^|;`]*)?)", line):
            tool, rest = match.group(1), match.group(2).split()
            if tool not in MODULES:
                continue
            sub = rest[0] if rest and not rest[0].startswith("-") and tool != "daad-agent" else ""
            for one in sub.split("/"):  # `daad-engine build/check` names two subcommands
                calls.append((tool, one, [t.split("=")[0] for t in rest if t.startswith("--")]))
    return calls


@lru_cache(maxsize=None)
def help_text(tool: str, sub: str) -> str:
    args = [sys.executable, "-m", MODULES[tool]] + ([sub] if sub else []) + ["--help"]
    proc = subprocess.run(args, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{tool} {sub} --help: {proc.stderr[-500:]}"
    return proc.stdout


def test_the_readme_is_short_and_has_a_table_of_contents() -> None:
    assert len(README.splitlines()) <= MAX_LINES
    anchors = re.findall(r"\]\(#([\w-]+)\)", README)
    headings = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", README, re.M)}
    assert anchors and set(anchors) <= headings, set(anchors) - headings


def test_every_make_target_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = {m for line in commands() for m in re.findall(r"\bmake (?:[A-Z_]+=\S+ )*([a-z]+)", line)}
    assert {"demo", "test"} <= targets
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_every_script_and_link_exists() -> None:
    scripts = {m for line in commands() for m in re.findall(r"python (benchmarks/\S+\.py|scripts/\S+\.py)", line)}
    links = set(re.findall(r"\]\(((?!http|#)[^)]+)\)", README))
    assert scripts and links
    for path in scripts | links:
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("tool,sub,flags", sorted({(t, s, tuple(f)) for t, s, f in tool_calls()}))
def test_every_tool_command_names_a_real_subcommand_and_flags(tool: str, sub: str, flags: Tuple[str, ...]) -> None:
    text = help_text(tool, sub)
    for flag in flags:
        assert flag in text, f"{tool} {sub}: {flag} not in its --help"
