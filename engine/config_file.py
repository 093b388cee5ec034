"""A YAML configuration file read into pydantic models: one style for every config of the product.

`load_yaml_model` reads the file, takes `${NAME}` from the environment, validates against a model whose
sections forbid unknown keys, resolves relative paths against the file's folder, and reports ALL problems
at once, one line each, as `agent.yaml: camera.mode: got 'fast', expected 'latest' or 'every'` (the
formatter of engine.validation, which the train config, bundle.yaml and thresholds.yaml use too).
The agent's agent.yaml (agent.config) and calibration's view of it (calibration.capture) read through it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple, Type, TypeVar, Union

from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .validation import StrictModel, dotted, format_errors, models_in, read_yaml, show

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

M = TypeVar("M", bound=BaseModel)


ConfigSection = StrictModel  # a section of a config file: unknown keys are errors (engine.validation)


def load_yaml_model(path: Union[str, Path], model: Type[M], missing_hint: str) -> M:
    """Read, expand, validate and resolve one YAML file into `model`; ConfigError with every problem, one per line.
    `missing_hint` ends the message of a file that does not exist (what to pass instead)."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise ConfigError(f"{name}: config file not found; {missing_hint}")
    raw = read_yaml(path, ConfigError, "fix the syntax")
    if not isinstance(raw, dict):
        required = [info.alias or key for key, info in model.model_fields.items() if info.is_required()]
        raise ConfigError(f"{name}: got {show(raw)}, expected a mapping with {', '.join(required)}")
    problems: List[str] = []
    data = _expand_env(raw, (), problems)
    if problems:
        raise ConfigError("\n".join(f"{name}: {e}" for e in problems))
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{name}: {line}" for line in format_errors(exc, data, model))) from None
    return _resolve_paths(config, path.resolve().parent)


def _expand_env(value: Any, loc: Tuple[Any, ...], errors: List[str]) -> Any:
    """${NAME} in strings -> the environment's value; an unset variable is an error naming the key."""
    if isinstance(value, dict):
        return {k: _expand_env(v, loc + (k,), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, loc + (i,), errors) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def sub(match: "re.Match[str]") -> str:
            var = match.group(1)
            if var not in os.environ:
                errors.append(f"{dotted(loc)}: got {show(value)}, expected environment variable {var} to be set")
                return match.group(0)
            return os.environ[var]

        return ENV_PATTERN.sub(sub, value)
    return value


def _resolve_paths(model: BaseModel, base: Path) -> Any:
    """Every relative Path field -> absolute against the config file's directory (~ expanded)."""
    updates: Dict[str, Any] = {}
    for field_name in type(model).model_fields:
        value = getattr(model, field_name)
        if isinstance(value, Path):
            value = value.expanduser()
            updates[field_name] = value if value.is_absolute() else (base / value)
        elif isinstance(value, BaseModel):
            updates[field_name] = _resolve_paths(value, base)
    return model.model_copy(update=updates)


def walk_paths(model: BaseModel, prefix: str) -> List[Tuple[str, Path]]:
    """(key.path, value) of every Path field, nested sections included."""
    found: List[Tuple[str, Path]] = []
    for field_name, info in type(model).model_fields.items():
        key = f"{prefix}.{info.alias or field_name}"
        value = getattr(model, field_name)
        if isinstance(value, Path):
            found.append((key, value))
        elif isinstance(value, BaseModel):
            found.extend(walk_paths(value, key))
    return found


def dump_example_keys(model: Type[BaseModel], prefix: str = "") -> List[str]:
    """Every key path of a config model (for the documentation test of an example file)."""
    keys: List[str] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        keys.append(key)
        for sub in models_in(info.annotation):
            if sub is not model:
                keys.extend(k for k in dump_example_keys(sub, key + ".") if k not in keys)
    return keys
