"""Typed settings of the apps: frozen dataclasses built once from the Hydra config, and their merging.

Every app (``arena-bench``, ``arena-suite``, ``arena-train``) turns its config into one frozen
dataclass in its ``settings`` module, validated there; the rest of the app reads attributes.
:class:`Settings` adds a read-only mapping view (``s["batch"]``, ``{**s}``) so scripts and tests
that treat settings as a dict keep working.

Owns: the settings base class and :func:`merge_settings`. Imports: the standard library only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
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
