"""A YAML configuration file read into pydantic models: one style for every config of the product.

`load_yaml_model` reads the file, takes `${NAME}` from the environment, validates against a model whose
sections forbid unknown keys, resolves relative paths against the file's folder, and reports ALL problems
at once, one line each, as `agent.yaml: camera.mode: got 'fast', expected 'latest' or 'every'`.
The agent's agent.yaml (agent.config) and calibration's view of it (calibration.capture) read through it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_SHOWN_CHARS = 60  # long values are cut in error messages

M = TypeVar("M", bound=BaseModel)


class ConfigSection(BaseModel):
    """A section of a config file: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def load_yaml_model(path: Union[str, Path], model: Type[M], missing_hint: str) -> M:
    """Read, expand, validate and resolve one YAML file into `model`; ConfigError with every problem, one per line.
    `missing_hint` ends the message of a file that does not exist (what to pass instead)."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise ConfigError(f"{name}: config file not found; {missing_hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        raise ConfigError(f"{name}: {where}: not valid YAML ({exc.problem}); fix the syntax") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: not valid YAML ({exc.__class__.__name__})") from None
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
                errors.append(f"{_dotted(loc)}: got {show(value)}, expected environment variable {var} to be set")
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


# -- error formatting ------------------------------------------------------------------------------
_EXPECTED_BY_TYPE = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "path_type": "a path",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "finite_number": "a finite number",
    "none_required": "nothing",
}


def format_errors(exc: ValidationError, data: Any, root: Type[BaseModel]) -> List[str]:
    """Pydantic errors -> `key.path: got X, expected Y`, one per key (alternatives of a union merged)."""
    merged: Dict[Tuple[Any, ...], Tuple[str, List[str]]] = {}
    lines_by_loc: Dict[Tuple[Any, ...], str] = {}
    for err in exc.errors():
        loc = _user_loc(tuple(err["loc"]), data)
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "missing":
            got, expected = "nothing", "a value (this key is required)"
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(root, loc[:-1], data)
            got, expected = f"unknown key {show(loc[-1])}", (f"one of {', '.join(allowed)}" if allowed else "no such key")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc = loc + ("kind",)
            got = show(ctx["tag"]) if "tag" in ctx else "nothing"
            expected = f"one of {ctx.get('expected_tags') or ', '.join(repr(k) for k in _tags_at(root, loc[:-1], data))}"
        elif kind in ("value_error", "assertion_error"):
            # a validator's own sentence: "mqtt: give either password_file or password_env, not both"
            msg = str(err["msg"])
            for lead in ("Value error, ", "Assertion failed, "):
                msg = msg[len(lead):] if msg.startswith(lead) else msg
            value = err.get("input")
            text = msg if isinstance(value, dict) else f"got {show(value)}; {msg}"
            lines_by_loc.setdefault(loc, text)
            continue
        else:
            got, expected = show(err.get("input")), _expected(kind, ctx, err["msg"])
        if loc in merged:
            if expected not in merged[loc][1]:
                merged[loc][1].append(expected)
        else:
            merged[loc] = (got, [expected])
    lines = [f"{_dotted(loc)}: got {got}, expected {' or '.join(exp)}" for loc, (got, exp) in merged.items()]
    return lines + [f"{_dotted(loc)}: {text}" for loc, text in lines_by_loc.items()]


def _expected(kind: str, ctx: Dict[str, Any], msg: str) -> str:
    if kind == "literal_error":
        return str(ctx["expected"])
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"a number {bounds[kind]} {limit:g}" if isinstance(limit, float) else f"a number {bounds[kind]} {limit}"
    if kind == "string_too_short":
        return f"at least {ctx.get('min_length')} character(s)"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"a string matching {ctx.get('pattern')}"
    if kind in _EXPECTED_BY_TYPE:
        return _EXPECTED_BY_TYPE[kind]
    return msg[0].lower() + msg[1:] if msg else kind


def _user_loc(loc: Tuple[Any, ...], data: Any) -> Tuple[Any, ...]:
    """Drop the tag pydantic inserts for discriminated unions (camera.source.video.path -> camera.source.path)
    and the type names it inserts for plain unions (int, str)."""
    out: List[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict):
            if part in node:
                out.append(part)
                node = node[part]
                continue
            if node.get("kind") == part:  # the discriminator's tag
                continue
            if isinstance(part, str) and ("[" in part or part in ("int", "str", "float", "bool")):
                continue
            out.append(part)
            node = None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            if isinstance(part, str) and ("[" in part or part in ("int", "str", "float", "bool")):
                continue
            out.append(part)
            node = None
    return tuple(out)


def _allowed_keys(root: Type[BaseModel], loc: Tuple[Any, ...], data: Any) -> List[str]:
    model = _model_at(root, loc, data)
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _tags_at(root: Type[BaseModel], loc: Tuple[Any, ...], data: Any) -> List[Any]:
    """The `kind` tags a discriminated union at loc accepts (a source without `kind` is told them all)."""
    parent = _model_at(root, loc[:-1], data) if loc else None
    info = parent.model_fields.get(loc[-1]) if parent is not None and isinstance(loc[-1], str) else None
    if info is None:
        return []
    return [tag for m in models_in(info.annotation) if "kind" in m.model_fields
            for tag in _literal_values(m.model_fields["kind"].annotation)]


def _model_at(model: Type[BaseModel], loc: Tuple[Any, ...], data: Any) -> Optional[Type[BaseModel]]:
    node = data
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            info = next((f for f in model.model_fields.values() if f.alias == part), None)
        if info is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        candidates = models_in(info.annotation)
        if not candidates:
            return None
        chosen = candidates[0]
        if len(candidates) > 1 and isinstance(node, dict):
            for cand in candidates:
                kind_field = cand.model_fields.get("kind")
                if kind_field is not None and node.get("kind") in _literal_values(kind_field.annotation):
                    chosen = cand
        model = chosen
    return model


def models_in(annotation: Any) -> List[Type[BaseModel]]:
    """The models inside an annotation (Optional[X], Union[A, B], Annotated[...])."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: List[Type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(models_in(arg))
    return found


def _literal_values(annotation: Any) -> Tuple[Any, ...]:
    import typing

    return tuple(typing.get_args(annotation))


def _dotted(loc: Tuple[Any, ...]) -> str:
    if not loc:
        return "(top level)"
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        text = "a mapping {" + ", ".join(map(str, value)) + "}"
    elif isinstance(value, list):
        text = f"a list of {len(value)}"
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


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
