"""Config fields that document and check themselves.

`opt(default, help, choices, minimum=, positive=, flat=)` declares a dataclass field whose help
text, allowed values and bounds live in its metadata (`flat`: its key in flat YAML and its flag
name, where that is not the field's name); the command line builds `--help` from them (see
mtp.cli.add_dataclass_flags), and `check_field` / `check_fields` check a value of the wrong type,
outside the choices or below the bound with one line that names the key, the value and what is
expected, whether it came from YAML or from a flag.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union

from .model import ConfigError


class OptionError(ConfigError):
    """A config value of the wrong type or out of range; one line, meant for users."""


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None,
        default_factory: Any = dataclasses.MISSING, minimum: float | None = None, positive: bool = False,
        flat: str | None = None) -> Any:
    """A field with its help, allowed values (`choices`), bound (`minimum`, inclusive, or
    `positive`: > 0) and `flat` name (see the module docstring) in its metadata."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "positive": positive, "flat": flat}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe(value: Any) -> str:
    kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _expected(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = _is_optional(hint)
    base = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(base)
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base)
    if words is None:
        words = "a list of numbers" if origin is list else "a mapping" if origin is dict else str(base)
    return words + (" or null" if optional else "")


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def flat_name(f: dataclasses.Field) -> str:
    """The field's key in flat YAML and its flag name (--flat-name)."""
    return f.metadata.get("flat") or f.name


def check_value(key: str, value: Any, hint: Any, choices: tuple[str, ...] | None = None,
                minimum: float | None = None, positive: bool = False) -> Any:
    """`value` checked against the type `hint` (int, float, str, bool, X | None, list[float],
    dict), the `choices` and the bound; returns it, with ints widened to float where a float is
    expected."""
    if value is None and _is_optional(hint):
        return None
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if _is_optional(hint) else hint
    bad = OptionError(f"{key} must be {_expected(hint)}, got {_describe(value)}")
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        # PyYAML reads 1e-3 (no dot) as a string, so a number written that way is accepted.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(f"{key} must be a finite number, got {value}")
    elif base is str:
        if not isinstance(value, str):
            raise bad
    elif typing.get_origin(base) is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(base)
        value = [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise bad
    if choices is not None and value not in choices:
        raise OptionError(f"{key} must be one of {', '.join(choices)}, got {_describe(value)}")
    if positive and value <= 0:
        raise OptionError(f"{key} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise OptionError(f"{key} must be >= {minimum}{' or none' if _is_optional(hint) else ''}, got {value}")
    return value


def check_field(key: str, value: Any, f: dataclasses.Field, hint: Any) -> Any:
    """`value` for the field `f` (of type `hint`) checked as its metadata says; `key` names it."""
    return check_value(key, value, hint, f.metadata.get("choices"), f.metadata.get("minimum"),
                       f.metadata.get("positive", False))


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalize, e.g. int -> float) every field of the dataclass instance `obj`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_field(prefix + f.name, getattr(obj, f.name), f, hints[f.name]))


def check_mapping(values: dict[str, Any], cls: type, prefix: str) -> dict[str, Any]:
    """Check a mapping meant for dataclass `cls` (e.g. `model:` overrides of ModelConfig) key by key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in names:
            raise OptionError(f"{prefix}{k} is not a {cls.__name__} field; expected one of {', '.join(sorted(names))}")
        out[k] = check_value(prefix + k, v, hints[k])
    return out


def help_text(f: dataclasses.Field, default: Any) -> str:
    """'what it does; one of a | b (default: x)' from a field's metadata."""
    text = f.metadata.get("help", "").rstrip(".")
    choices = f.metadata.get("choices")
    if choices:
        text += ("; " if text else "") + "one of " + " | ".join(choices)
    shown = "none" if default is None else default
    return f"{text} (default: {shown})".strip()
