"""How the four tools speak on stderr, in one form: `daad-<tool>: error: …` and `daad-<tool>: warning: …`,
and how every rate is written (percent), so a technician reads one style whichever tool talks.

No third-party imports: engine/ is the bottom layer and the agent imports this too.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional, TextIO

from .errors import DaadError

ERROR = "error"
WARNING = "warning"
EXIT_ERROR = 1  # a DaadError: one line naming the file, the field and the fix
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def tagged(prog: str, kind: str, message: str) -> str:
    """Every line of `message` as `prog: kind: line` (a config with three bad keys is three lines)."""
    lines = str(message).splitlines() or [""]
    return "\n".join(f"{prog}: {kind}: {line}" for line in lines)


def error(prog: str, message: object, stream: Optional[TextIO] = None) -> None:
    print(tagged(prog, ERROR, str(message)), file=stream or sys.stderr)


def warning(prog: str, message: object, stream: Optional[TextIO] = None) -> None:
    print(tagged(prog, WARNING, str(message)), file=stream or sys.stderr)


class ToolFormatter(logging.Formatter):
    """Log records in the tools' form: `daad-train: warning: …`; below WARNING (asked for with -v) the
    logger's name too, which is what a developer debugging needs and a user reading warnings does not."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            message = f"{record.name}: {message}"
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return tagged(self.prog, record.levelname.lower(), message)


def setup_tool_logging(prog: str, level: int) -> None:
    """Root logging to stderr in the tools' form (for the one-shot CLIs; the agent keeps timestamps)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ToolFormatter(prog))
    logging.basicConfig(level=level, handlers=[handler])


def run_tool(prog: str, command: Callable[[], int]) -> int:
    """A tool's command with the tools' exits: a DaadError is `prog: error: ...` and 1, Ctrl-C `prog: interrupted`
    and 130; anything else is a bug and keeps its traceback."""
    try:
        return int(command())
    except DaadError as err:
        error(prog, err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def pct(rate: float) -> str:
    """A rate as a percentage, with enough digits for small rates: 0.02 -> '2%', 0.00217 -> '0.217%'."""
    if rate == 0:
        return "0%"
    return f"{rate * 100:.2g}%" if rate < 0.001 else f"{rate * 100:.3g}%"
