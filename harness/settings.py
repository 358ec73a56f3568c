"""Settings dictionaries of the benchmark and suite CLIs: defaults overlaid with what the user gave."""

from __future__ import annotations


def merge_settings(base: dict, extra: dict | None) -> dict:
    """``base`` overlaid with ``extra``, nested dicts merged key by key; neither input is modified."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out
