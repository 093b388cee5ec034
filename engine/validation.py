"""One validation style for every file a person or a tool writes (agent.yaml, the train config, bundle.yaml,
thresholds.yaml): pydantic models that forbid unknown keys, and every problem as one line
`FILE: key.path: got X, expected Y`.

`validate` checks a parsed YAML mapping against a model and raises the caller's DaadError subclass;
`format_errors` turns a pydantic ValidationError into those lines (one per key, alternatives of a union
merged); `show` and `dotted` write a value and a key path the same way for the callers' own rules.
"""
from __future__ import annotations

import difflib
import typing
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from typing_extensions import Annotated  # typing.Annotated is 3.9+; typing_extensions comes with pydantic

from .errors import DaadError

MAX_SHOWN_CHARS = 60  # long values are cut in error messages
MAX_LISTED_KEYS = 16  # an unknown key in a longer section is answered with the nearest known ones
M = TypeVar("M", bound=BaseModel)


def _as_text(value: Any) -> Any:
    """An unquoted number or date YAML read from a hand-written file -> its text, as str() read such files
    before (`bundle_name: 7`, `created: 2026-01-05`); mappings and lists stay errors."""
    if isinstance(value, (int, float, date)) and not isinstance(value, bool):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_as_text)]  # a string, or a scalar YAML read as a number or a date


class StrictModel(BaseModel):
    """A section of a file: unknown keys are errors (a typo must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def validate(model: Type[M], data: Any, name: str, error: Type[DaadError], fix: str = "",
             context: Optional[Dict[str, Any]] = None) -> M:
    """`model` from the mapping `data` read from file `name`; else `error` with every problem, one line
    each: `name: key.path: got X, expected Y; fix`. `context` goes to the model's validators."""
    if not isinstance(data, dict):
        required = [n for n, f in model.model_fields.items() if f.is_required()]
        expected = f"a mapping with {', '.join(required)}" if required else "a mapping"
        raise error(_line(name, f"got {show(data)}, expected {expected}", fix))
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        lines = format_errors(exc, data, model)
    raise error("\n".join(_line(name, line, fix) for line in lines)) from None


def read_yaml(path: Path, error: Type[DaadError], fix: str) -> Any:
    """Parse a YAML file; a syntax or encoding error becomes `error` naming the file, where, and the fix:
    `FILE: line 3, column 8: not valid YAML (mapping values are not allowed here); fix`."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise error(f"{path}: {where}not valid YAML ({exc.problem}); {fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid YAML ({exc.__class__.__name__}); {fix}") from None


def _line(name: str, problem: str, fix: str) -> str:
    return f"{name}: {problem}" + (f"; {fix}" if fix else "")


# -- pydantic errors -> `key.path: got X, expected Y` --------------------------------------------------
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
    "dataclass_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "finite_number": "a finite number",
    "none_required": "nothing",
}


def format_errors(exc: ValidationError, data: Any, model: Type[BaseModel]) -> List[str]:
    """Pydantic errors of `model.model_validate(data)` -> `key.path: got X, expected Y`, one per key
    (the alternatives of a union merged into `expected A or B`)."""
    merged: Dict[Tuple[Any, ...], Tuple[str, List[str]]] = {}
    lines_by_loc: Dict[Tuple[Any, ...], str] = {}
    short: Dict[Tuple[Any, ...], int] = {}  # list -> the items it needs at least
    for err in exc.errors():
        loc = _user_loc(tuple(err["loc"]), data)
        kind = err["type"]
        ctx = err.get("ctx") or {}
        if kind == "missing" and loc and isinstance(loc[-1], int):  # a list shorter than its fixed length
            short[loc[:-1]] = max(short.get(loc[:-1], 0), loc[-1] + 1)
            continue
        elif kind == "missing":
            got, expected = "nothing", "a value (this key is required)"
        elif kind == "extra_forbidden":
            got, expected = f"unknown key {show(loc[-1])}", _known_keys(_allowed_keys(model, loc[:-1], data), loc[-1])
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tag_key = str(ctx.get("discriminator", "'kind'")).strip("'\"")
            got = show(ctx["tag"]) if "tag" in ctx else "nothing"
            expected = f"one of {ctx.get('expected_tags') or ', '.join(map(repr, _tags(model, loc, data, tag_key)))}"
            loc = loc + (tag_key,)
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
    for loc, need in short.items():
        merged[loc] = (show(_at(data, loc)), [f"at least {need} items"])
    lines = [f"{dotted(loc)}: got {got}, expected {' or '.join(exp)}" for loc, (got, exp) in merged.items()]
    return lines + [f"{dotted(loc)}: {text}" for loc, text in lines_by_loc.items()]


def _known_keys(allowed: List[str], key: Any) -> str:
    """`one of a, b, c`; for a long section, the nearest keys to the unknown one (a typo) when there are any."""
    if not allowed:
        return "no such key"
    near = difflib.get_close_matches(str(key), allowed, n=3) if len(allowed) > MAX_LISTED_KEYS else []
    if near:
        return f"a known key (the nearest of {len(allowed)}: {', '.join(near)})"
    return f"one of {', '.join(allowed)}"


def _at(data: Any, loc: Tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


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
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items"
    if kind == "too_short":
        return f"at least {ctx.get('min_length')} items"
    if kind in _EXPECTED_BY_TYPE:
        return _EXPECTED_BY_TYPE[kind]
    return msg[0].lower() + msg[1:] if msg else kind


_TYPE_TAGS = ("int", "str", "float", "bool")


def _user_loc(loc: Tuple[Any, ...], data: Any) -> Tuple[Any, ...]:
    """Drop the tag pydantic inserts for discriminated unions (camera.source.video.path -> camera.source.path)
    and the type names it inserts for plain unions and constrained types (int, str, constrained-int)."""
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
            if _is_type_tag(part):
                continue
            out.append(part)
            node = None
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            if _is_type_tag(part):
                continue
            out.append(part)
            node = None
    return tuple(out)


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS
                                      or part.startswith(("constrained-", "function-")))


def _allowed_keys(model: Type[BaseModel], loc: Tuple[Any, ...], data: Any) -> List[str]:
    found = _model_at(model, loc, data)
    if found is None:
        return []
    return [info.alias or name for name, info in found.model_fields.items()]


def _tags(model: Type[BaseModel], loc: Tuple[Any, ...], data: Any, tag_key: str) -> List[Any]:
    """The discriminator values the union at `loc` accepts (the `kind`s of the models it joins)."""
    parent = _model_at(model, loc[:-1], data) if loc else None
    info = parent.model_fields.get(loc[-1]) if parent is not None and isinstance(loc[-1], str) else None
    tags: List[Any] = []
    for cand in models_in(info.annotation) if info is not None else []:
        field = cand.model_fields.get(tag_key)
        if field is not None:
            tags.extend(typing.get_args(field.annotation))
    return tags


def _model_at(model: Type[BaseModel], loc: Tuple[Any, ...], data: Any) -> Optional[Type[BaseModel]]:
    node = data
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            continue
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
                if kind_field is not None and node.get("kind") in typing.get_args(kind_field.annotation):
                    chosen = cand
        model = chosen
    return model


def models_in(annotation: Any) -> List[Type[BaseModel]]:
    """The pydantic models an annotation names (in a union, a list, an Optional...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: List[Type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(models_in(arg))
    return found


# -- values and key paths as the messages show them ------------------------------------------------------
def dotted(loc: Sequence[Any]) -> str:
    """('camera', 'source', 'path') -> camera.source.path; list items as graphs[1].file."""
    if not loc:
        return "(top level)"
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def show(value: Any) -> str:
    """A value as YAML would read it back, cut to MAX_SHOWN_CHARS: null, true, 'text', a mapping {a, b}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        text = "a mapping {" + ", ".join(map(str, value)) + "}"
    elif isinstance(value, (list, tuple)):
        text = f"a list of {len(value)}"
    else:
        text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."
