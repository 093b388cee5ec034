"""Error classes shared by the runtime packages.

Each carries a message meant for a person: what file, which field, what to do.
Command-line entry points catch `DaadError` and print `str(err)` with a non-zero exit.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Type


class DaadError(Exception):
    """Base class of every error a user should see as one clear line, not a traceback."""


class BundleError(DaadError):
    """A model bundle is missing, truncated, tampered with or of an unknown format."""


class ImageError(DaadError):
    """An image could not be read or has an unusable shape or dtype."""


class BackendError(DaadError):
    """An inference backend cannot be opened or was fed the wrong input."""


class EngineBuildError(DaadError):
    """A TensorRT engine could not be built."""


class DatasetError(DaadError):
    """A dataset directory is not in the expected layout."""


class ConfigError(DaadError):
    """A configuration file is invalid."""


class ThresholdsError(DaadError):
    """A thresholds file is invalid or was made for another bundle."""


class CameraError(DaadError):
    """A frame source cannot be opened or read."""


def require_module(name: str, error: Type[DaadError], message: str) -> ModuleType:
    """import `name`, or raise `error(message)` (what to install) when an optional dependency is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise error(message) from exc
