"""Runtime type checks of config dataclass fields, shared by the attention and task registries.

Configs arrive from YAML, the command line and Python code, so a field annotated ``int`` may get ``"8"`` or
``8.0``; both registries reject such values with a message naming the field (the callers word it). numpy scalars
count as numbers (``numbers.Integral`` / ``numbers.Real``), bools never do.
"""

from __future__ import annotations

import numbers
import types
import typing
from typing import Any, Literal


def value_matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (Any, unions, Optional, Literal, tuples, bool/int/float, classes)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(value_matches(item, args[0]) for item in value)
        return len(args) == len(value) and all(value_matches(i, a) for i, a in zip(value, args))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe_type(annotation: Any) -> str:
    """What an error message says is allowed: ``one of 'a', 'b'`` for a Literal, else the type's name."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def normalised_number(value: Any, annotation: Any) -> Any:
    """Plain ``int`` / ``float`` for numpy scalars and ints given for floats (stable config hashes), else ``value``."""
    if annotation is float and not isinstance(value, float):
        return float(value)
    if annotation is int and isinstance(value, numbers.Integral) and type(value) is not int:
        return int(value)
    return value
