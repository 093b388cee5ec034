"""daad-agent: score camera frames and publish defects over MQTT (the systemd service).

    daad-agent --config /etc/daad-inspect/agent.yaml              run until SIGTERM (or the source ends)
    daad-agent --config agent.yaml --check-config                 validate config, bundle, thresholds; exit
    daad-agent --config agent.yaml --max-frames 100 --log-json    score 100 frames, JSON log lines

Exit status: 0 after a clean stop (SIGTERM/SIGINT, end of a file source, --max-frames), 1 on any
error (one line per problem on stderr), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from engine.errors import DaadError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# extra= fields worth keeping in JSON lines
JSON_EXTRAS = ("event_id", "seq", "score", "source_id", "reason")
NOISY_LOGGERS = ("paho",)
HANDLER_NAME = "daad-agent"


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
        prog="daad-agent",
        description="Score camera frames with a DAAD bundle and publish defects over MQTT.",
        epilog="Signals: SIGTERM/SIGINT stop cleanly (exit 0); SIGHUP reloads thresholds.yaml.",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="FILE", help="agent.yaml")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config, the bundle (hashes) and the thresholds (made for this bundle), then exit")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines (overrides logging.json)")
    parser.add_argument("--max-frames", type=_positive_int, metavar="N", help="exit 0 after scoring N frames")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected a positive integer")
    return value


def check_config(config: Any) -> List[str]:
    """Everything that can be checked without starting: bundle hashes, thresholds' bundle, camera, secrets."""
    from calibration.thresholds import load_thresholds
    from engine.bundle import describe, load_bundle

    from .mqtt import resolve_password
    from .sources import open_source

    bundle = load_bundle(config.model.bundle, verify=True)
    thresholds = load_thresholds(config.thresholds.path, bundle)
    source = open_source(config.camera)  # builds pipeline strings; opens nothing
    resolve_password(config.mqtt)
    return [
        f"bundle: {describe(bundle)}",
        f"thresholds: image {thresholds.image_threshold:.6g}, pixel {thresholds.pixel_threshold:.6g}, "
        f"min area {thresholds.min_defect_area} (made for this bundle)",
        f"camera: {config.camera.name}: {source.describe()}, mode {config.camera.mode}",
        f"mqtt: {config.mqtt.host}:{config.mqtt.port} station {config.mqtt.station}",
    ]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a usage error
    setup_logging("INFO", args.log_json)
    try:
        from .config import load_config

        config = load_config(args.config)
        setup_logging(config.logging.level, args.log_json or config.logging.json_lines)
        if args.check_config:
            for line in check_config(config):
                print(line)
            print(f"{args.config}: OK")
            return 0
        from .app import App

        app = App(config, max_frames=args.max_frames, config_file=str(args.config))
        app.install_signal_handlers()
        return app.run()
    except DaadError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except Exception:  # a bug: keep the traceback in the journal, exit non-zero so systemd restarts us
        logger.critical("daad-agent: unexpected error", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
