"""The four tools speak one form on stderr: `daad-<tool>: error: …` (and `: warning: …`), rates in percent.

Each console script is run as declared in pyproject.toml (its module:function), in a real process, on a bad
file and on a bad flag: the error line starts with the tool's name, the exit status is non-zero, no traceback.
"""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from engine.messages import ToolFormatter, pct, tagged

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def console_scripts() -> Dict[str, str]:
    """name -> "module:function" from pyproject.toml's [project.scripts] (a plain parse: 3.8 has no tomllib)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\S+)\s*=\s*"([\w.]+:\w+)"', section, flags=re.M))


def run_script(name: str, args: List[str], tmp_path: Path) -> subprocess.CompletedProcess:
    module, func = console_scripts()[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=str(REPO), capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                                  "DAAD_PLAN_CACHE": str(tmp_path / "plans"), "HOME": str(tmp_path)})


# (tool, arguments naming a file that is not there, what the one error line names, the exit status: the agent's
# refusal of its configuration is 78, which systemd does not restart)
BAD_FILES = [
    ("daad-train", ["eval", "--checkpoint", "{tmp}/none.pt", "--data", "{tmp}", "--out", "{tmp}/eval"], "none.pt", 1),
    ("daad-engine", ["info", "{tmp}/no_bundle"], "no_bundle", 1),
    ("daad-calibrate", ["fit", "{tmp}/no_capture", "--false-alarm-rate", "1%"], "no_capture", 1),
    ("daad-agent", ["--config", "{tmp}/agent.yaml", "--check-config"], "agent.yaml", 78),
]


def test_every_console_script_is_covered() -> None:
    assert sorted(console_scripts()) == sorted(row[0] for row in BAD_FILES)


@pytest.mark.parametrize("tool,args,names,status", BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_an_error_about_a_file_is_one_line_starting_with_the_tools_name(tool: str, args: List[str], names: str,
                                                                      status: int, tmp_path: Path) -> None:
    proc = run_script(tool, [a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), proc.stderr
    assert names in lines[0], lines[0]


@pytest.mark.parametrize("tool", [row[0] for row in BAD_FILES])
def test_a_bad_flag_is_a_usage_error_starting_with_the_tools_name(tool: str, tmp_path: Path) -> None:
    proc = run_script(tool, ["--no-such-flag"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: "), proc.stderr


def test_warnings_and_multi_line_errors_carry_the_prefix_on_every_line() -> None:
    assert tagged("daad-agent", "error", "a.yaml: camera.mode: bad\na.yaml: mqtt.port: bad").splitlines() == [
        "daad-agent: error: a.yaml: camera.mode: bad", "daad-agent: error: a.yaml: mqtt.port: bad"]
    record = logging.LogRecord("train.fit", logging.WARNING, __file__, 1, "only %d images", (3,), None)
    assert ToolFormatter("daad-train").format(record) == "daad-train: warning: only 3 images"
    debug = logging.LogRecord("train.fit", logging.DEBUG, __file__, 1, "step %d", (7,), None)
    assert ToolFormatter("daad-train").format(debug) == "daad-train: debug: train.fit: step 7"


@pytest.mark.parametrize("rate,text", [
    (0.02, "2%"),
    (0.0217, "2.17%"),
    (0.00217, "0.217%"),
    (0.00012, "0.012%"),  # below 0.1%: two significant digits
    (0.0, "0%"),
    (0.125, "12.5%"),
])
def test_rates_are_written_in_percent(rate: float, text: str) -> None:
    assert pct(rate) == text
