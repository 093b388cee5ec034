"""daad-agent: score camera frames and publish defects over MQTT (the systemd service).

    daad-agent --config /etc/daad-inspect/agent.yaml              run until SIGTERM (or the source ends)
    daad-agent --config agent.yaml --check-config                 validate config, bundle, thresholds; exit
    daad-agent --config agent.yaml --check-broker                 ... and connect to the broker once
    daad-agent --config agent.yaml --max-frames 100 --log-json    score 100 frames, JSON log lines

Exit status: 0 after a clean stop (SIGTERM/SIGINT, end of a file source, --max-frames);
78 (EX_CONFIG) when the config, bundle, thresholds or model backend are refused: restarting cannot fix
that, so the systemd units list 78 in RestartPreventExitStatus= (fix the named file, then
`systemctl restart daad-agent`); 1 on any other error (a camera error, a bug): systemd restarts it;
2 for a usage error. Every refusal is one line on stderr naming the file, the field and the fix.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from engine.cli_types import positive_int
from engine.errors import (BackendError, BundleError, ConfigError, DaadError, EngineBuildError, ImageError,
                           ThresholdsError)
from engine.messages import error

logger = logging.getLogger(__name__)


class BrokerError(DaadError):
    """--check-broker: the broker refused the connection or could not be reached (exit 1: it may come back)."""

EXIT_OK = 0
EXIT_ERROR = 1  # systemd restarts (Restart=on-failure)
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: the units' RestartPreventExitStatus= stops the restarts
# What no restart can fix: a file must change first. A CameraError stays EXIT_ERROR (a camera may come back).
FATAL_ERRORS = (ConfigError, BundleError, ThresholdsError, BackendError, EngineBuildError, ImageError)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# extra= fields worth keeping in JSON lines
JSON_EXTRAS = ("event_id", "seq", "score", "source_id", "reason")
NOISY_LOGGERS = ("paho",)
PROG = "daad-agent"
HANDLER_NAME = PROG


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (+ event fields, + exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in JSON_EXTRAS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(LOG_FORMAT))
    handler.set_name(HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == HANDLER_NAME:  # ours from an earlier call; others (e.g. a test's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score camera frames with a DAAD bundle and publish defects over MQTT.",
        epilog="Signals: SIGTERM/SIGINT stop cleanly (exit 0); SIGHUP reloads thresholds.yaml.",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="FILE", help="agent.yaml")
    parser.add_argument("--check-config", action="store_true",
                        help="a start short of camera and broker: validate the config, load the bundle (manifest, graph "
                             "against bundle.yaml), the thresholds (made for this bundle) and the backend, score one "
                             "blank frame, then exit (0 OK, 78 refused)")
    parser.add_argument("--check-broker", action="store_true",
                        help="--check-config, and connect to the broker once (TLS, credentials) and say why "
                        "it refuses, if it does")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines (overrides logging.json)")
    parser.add_argument("--max-frames", type=positive_int, metavar="N", help="exit 0 after scoring N frames")
    return parser



def check_config(config: Any, config_file: Optional[str] = None) -> List[str]:
    """Everything a start does short of opening the camera and the broker (agent.preflight)."""
    from .preflight import preflight

    return preflight(config, config_file)


def check_broker(config: Any) -> str:
    """One connection to the broker as the agent makes it; BrokerError with the reason when refused."""
    from .mqtt import probe_broker

    s = config.mqtt
    problem = probe_broker(s)
    if problem is not None:
        raise BrokerError(f"mqtt: {s.host}:{s.port}: {problem.reason}: {problem.text}")
    return f"mqtt: {s.host}:{s.port} accepted the connection" + (" (TLS)" if s.tls is not None else "")


def publish_refusal(config: Any, line: str) -> None:
    """A refused start leaves `state: error` with its reason as the retained status, where the broker is reachable,
    so a dashboard shows why the station stopped rather than its last `running` status."""
    from .mqtt import publish_retained_once, topics
    from .payloads import error_status_payload

    payload = error_status_payload(station=config.mqtt.station, error=line, timestamp=datetime.now(timezone.utc))
    if not publish_retained_once(config.mqtt, topics(config.mqtt).status, json.dumps(payload).encode()):
        logger.info("the refusal could not be published on the status topic (broker unreachable)")


def exit_code(exc: DaadError) -> int:
    return EXIT_CONFIG if isinstance(exc, FATAL_ERRORS) else EXIT_ERROR


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a usage error
    setup_logging("INFO", args.log_json)
    config = None
    try:
        from .config import load_config

        config = load_config(args.config)
        # --check-config reports on stdout; its stderr carries only warnings and the one refusal line
        args.check_config = args.check_config or args.check_broker
        level = "WARNING" if args.check_config and config.logging.level in ("DEBUG", "INFO") else config.logging.level
        setup_logging(level, args.log_json or config.logging.json_lines)
        if args.check_config:
            for line in check_config(config, str(args.config)):
                print(line)
            if args.check_broker:
                print(check_broker(config))
            print(f"{args.config}: OK")
            return EXIT_OK
        from .app import App

        app = App(config, max_frames=args.max_frames, config_file=str(args.config))
        app.install_signal_handlers()
        return app.run()
    except DaadError as exc:
        error(PROG, exc)
        code = exit_code(exc)
        if code == EXIT_CONFIG and config is not None and not args.check_config:
            publish_refusal(config, f"{PROG}: error: {exc}")
        return code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:  # a bug: keep the traceback in the journal, exit non-zero so systemd restarts us
        logger.critical("%s: unexpected error", PROG, exc_info=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
