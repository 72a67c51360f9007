"""Config fields that document and check themselves.

`opt(default, help, choices, group)` declares a dataclass field whose help text, allowed values
and concern (the `--help` section it is listed in) live in its metadata; the command line builds
`--help` from them (see mtp.cli.add_dataclass_flags),
and `check_fields` checks a value of the wrong type or outside the choices with one line that
names the key, the value and what is expected, whether it came from YAML or from a flag.
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
        default_factory: Any = dataclasses.MISSING, group: str | None = None) -> Any:
    meta = {"help": help, "choices": choices, "group": group}
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


def check_value(key: str, value: Any, hint: Any, choices: tuple[str, ...] | None = None) -> Any:
    """`value` checked against the type `hint` (int, float, str, bool, X | None, list[float],
    dict); returns it, with ints widened to float where a float is expected."""
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
    return value


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check (and normalize, e.g. int -> float) every field of the dataclass instance `obj`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = check_value(prefix + f.name, getattr(obj, f.name), hints[f.name], f.metadata.get("choices"))
        object.__setattr__(obj, f.name, value)


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
