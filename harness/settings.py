"""Typed settings of the apps: frozen dataclasses built once from the Hydra config, and their merging.

Every app (``arena-bench``, ``arena-suite``, ``arena-train``) turns its config into one frozen
dataclass in its ``settings`` module, validated there; the rest of the app reads attributes.
:class:`Settings` adds a read-only mapping view (``s["batch"]``, ``{**s}``) so scripts and tests
that treat settings as a dict keep working.

The checks every app shares live here too: :func:`check_known` (a key nothing reads is an error naming the
valid ones and a close match) and :func:`as_int` / :func:`as_float` / :func:`as_bool` (a value of the wrong
type is an error naming its key, never a traceback from ``int()``).

Owns: the settings base class, :func:`merge_settings`, the shared key and type checks. Imports: the standard
library only.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from typing import Any


def merge_settings(base: dict, extra: dict | None) -> dict:
    """``base`` overlaid with ``extra``, nested dicts merged key by key; neither input is modified."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


class Settings:
    """Mixin for frozen settings dataclasses: a read-only mapping view of the fields."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for records and hashing)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def close_match(word: str, allowed: Iterable[str]) -> str | None:
    """The allowed name closest to a mistyped ``word`` (``trian`` -> ``train``), or None when none is close."""
    found = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.7)
    return found[0] if found else None


def check_known(keys: Iterable[str], allowed: Iterable[str], section: str = "") -> None:
    """ValueError (one line) naming every key of ``keys`` not in ``allowed``, with the allowed ones and, for
    each, a close match; ``section`` (``"train"``) prefixes the names, ``train.stepz``."""
    allowed = list(allowed)
    unknown = [str(k) for k in keys if k not in allowed]
    if not unknown:
        return
    prefix = f"{section}." if section else ""
    hints = [f"{prefix}{close_match(k, allowed)}" for k in unknown if close_match(k, allowed)]
    raise ValueError(f"unknown setting(s) {', '.join(prefix + k for k in unknown)}: nothing reads "
                     f"{'it' if len(unknown) == 1 else 'them'}; {section or 'the top level'} takes "
                     f"{', '.join(sorted(allowed))}" + (f" (did you mean {', '.join(hints)}?)" if hints else ""))


def as_int(value: Any, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int (an integral float such as ``1e3`` too); None passes when ``optional``.

    Raises ValueError naming ``key``, what it must be and what it got (``seed=abc``, ``train.max_steps=2.5``)."""
    if value is None and optional:
        return None
    bound = f" >= {minimum}" if minimum is not None else ""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or (minimum is not None and value < minimum):
        raise ValueError(f"invalid {key!r}: must be an integer{bound}{' or null' if optional else ''}, got {value!r}")
    return int(value)


def as_float(value: Any, key: str, minimum: float | None = None, optional: bool = False,
             strict: bool = False) -> float | None:
    """``value`` as a float (an int too); None passes when ``optional``; ``minimum`` is inclusive unless
    ``strict``. Raises ValueError naming ``key`` and what it got."""
    if value is None and optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    below = ok and minimum is not None and (value <= minimum if strict else value < minimum)
    if not ok or below:
        bound = f" {'>' if strict else '>='} {minimum}" if minimum is not None else ""
        raise ValueError(f"invalid {key!r}: must be a number{bound}{' or null' if optional else ''}, got {value!r}")
    return float(value)


def as_bool(value: Any, key: str) -> bool:
    """``value`` when it is a bool (``true``/``false`` on the command line); ValueError naming ``key`` otherwise
    (``force=yes`` is not silently true)."""
    if not isinstance(value, bool):
        raise ValueError(f"invalid {key!r}: must be true or false, got {value!r}")
    return value
