"""Harness: the shared backbone, training (arena-train), benchmarks, results store and report.

Data flows one way: run (:mod:`harness.train`, :mod:`harness.bench`, :mod:`harness.suite`) -> records in
the store (:mod:`harness.store`) -> analysis (:mod:`harness.analysis`, :mod:`harness.display`) -> report
(:mod:`harness.report`). docs/ARCHITECTURE.md draws it and lists what each room may import;
tests/test_architecture.py enforces it.

    from harness import load_records, export_records
    df = load_records("results", kind="train")

The store's functions are re-exported lazily, so ``import harness.measure`` stays light.
"""

from __future__ import annotations

from typing import Any

_STORE_API = ("load_records", "export_records", "write_record", "config_hash")


def __getattr__(name: str) -> Any:
    if name in _STORE_API:
        from harness import store

        return getattr(store, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


__all__ = list(_STORE_API)
