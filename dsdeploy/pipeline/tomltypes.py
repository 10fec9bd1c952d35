"""Checking plain TOML values against dataclass type hints (for recipes).

``parse_override("section.key=value")`` reads one ``--set`` override (the value is TOML, else a
plain string). ``coerce(value, hint)`` accepts a value when it fits the hint (ints pass for floats; a
bool is never an int) and returns it converted; ``type_name`` and ``describe`` word the
error messages.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import tomllib

from dsdeploy.errors import RecipeError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a table"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "unset",
            Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``): ints are accepted for floats; bool is never an int."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp)
        out = []
        for v in value:
            ok, c = coerce(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict or tp is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}" if not isinstance(value, dict) else "a table"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"finetune.epochs=2"`` -> (["finetune", "epochs"], 2); the value is TOML, else a plain string."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts) or len(parts) > 2:
        raise RecipeError(f"--set {text!r}: use section.key=value (e.g. finetune.epochs=2) or key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as digits or a path
    return parts, value
