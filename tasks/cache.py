"""On-disk cache of task arrays, keyed by a hash of every setting that changes the data.

Layout: ``<cache_dir>/<task>-<key>/`` holds one ``<split>.<field>.npy`` per array and ``manifest.json`` with the
settings that produced it and, per file, its byte size, shape, dtype and CRC-32.

Why numpy ``.npy`` + a JSON manifest rather than ``datasets`` Arrow files: the task data are a few dense
fixed-width integer matrices, and training gathers random rows from them. ``np.load(mmap_mode="r")`` maps them
with zero copy and a batch is one fancy-indexing gather, with the exact compact dtype we chose (uint8/uint16);
Arrow would add a column/row layer and per-batch conversion for no gain. The manifest makes the cache
self-describing (``settings``) and checkable.

Guarantees:

* Writes are atomic: everything is written into a temporary sibling directory that is renamed into place last;
  a crash leaves at most a stray ``.tmp-*`` directory, never a half-written entry.
* An entry is built once even when many processes (a cluster sweep's jobs) ask for it at the same time: the
  builder holds a file lock (``<entry>.lock``, the ``filelock`` package) and the others wait for it, then load
  the entry it wrote (the empty lock file stays: deleting it would let a third process lock a new file while a
  second still holds the old one). ``arena-data prepare`` builds entries ahead of a sweep.
* Every load checks each file's size, shape and dtype and its CRC-32 (CRC, not a cryptographic hash: it detects
  truncation and bit rot at ~2 GB/s, e.g. 0.1 s for the 200 MB ListOps cache; nobody is attacking the cache).
  A bad entry is reported with a warning, removed and rebuilt, never silently used. A verified entry is not
  re-hashed again in the same process unless its files changed.
* The manifest may carry the builder's ``notes`` (where the data came from, files skipped and why), read back
  with :func:`read_notes`.
* ``cache_dir`` defaults to ``$ARENA_CACHE_DIR`` or ``.arena_cache``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 16 << 20
# (entry dir) -> file stats at the time it was verified; saves re-hashing within one process.
_VERIFIED: dict[str, tuple] = {}


def default_cache_dir() -> str:
    """``$ARENA_CACHE_DIR`` when set, else ``.arena_cache`` (relative to the working directory)."""
    return os.environ.get("ARENA_CACHE_DIR") or ".arena_cache"


def file_identity(path: str) -> dict[str, Any]:
    """Identity of a source file for cache keys: absolute path, size and modification time (ns)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(settings: dict[str, Any]) -> str:
    """Stable hex hash of ``settings`` (plus the cache format version)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(cache_dir: str | None, name: str, settings: dict[str, Any]) -> str:
    """Directory of the cache entry for task ``name`` with ``settings``."""
    return os.path.join(cache_dir or default_cache_dir(), f"{name}-{cache_key(settings)}")


def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _stats(directory: str, names: list[str]) -> tuple:
    out = []
    for n in sorted(names):
        st = os.stat(os.path.join(directory, n))
        out.append((n, st.st_size, st.st_mtime_ns))
    return tuple(out)


def save_entry(directory: str, arrays: dict[str, dict[str, np.ndarray]], settings: dict[str, Any],
               notes: dict[str, Any] | None = None) -> None:
    """Write ``arrays`` atomically as a cache entry at ``directory`` (no-op if another writer got there first)."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(directory)}-", dir=parent)
    try:
        files = {}
        for split, fields in arrays.items():
            for field, array in fields.items():
                if "." in split or "." in field:
                    raise ValueError(f"split/field names may not contain '.': {split!r}, {field!r}")
                fname = f"{split}.{field}.npy"
                path = os.path.join(tmp, fname)
                np.save(path, np.ascontiguousarray(array), allow_pickle=False)
                files[fname] = {"size": os.path.getsize(path), "shape": list(array.shape),
                                "dtype": np.dtype(array.dtype).str, "crc32": _crc32(path)}
        manifest = {"format_version": FORMAT_VERSION, "settings": settings, "files": files, "notes": notes or {}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, directory)
            # The checksums were just computed from these very files: no need to re-hash them on the next load.
            _VERIFIED[os.path.abspath(directory)] = _stats(directory, list(files))
        except OSError:
            if not os.path.isdir(directory):  # a concurrent writer's identical entry is fine; anything else is not
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_entry(directory: str) -> dict[str, dict[str, np.ndarray]]:
    """Memory-map a verified cache entry. Raises ``CacheError`` naming the problem when it is incomplete/corrupt."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CacheError(f"unreadable manifest: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"format version {manifest.get('format_version')} != {FORMAT_VERSION}")
    files = manifest.get("files", {})
    for fname, meta in files.items():
        path = os.path.join(directory, fname)
        if not os.path.exists(path):
            raise CacheError(f"missing file {fname}")
        size = os.path.getsize(path)
        if size != meta["size"]:
            raise CacheError(f"{fname} has {size} bytes, manifest says {meta['size']} (truncated?)")
    stats = _stats(directory, list(files))
    if _VERIFIED.get(os.path.abspath(directory)) != stats:
        for fname, meta in files.items():
            crc = _crc32(os.path.join(directory, fname))
            if crc != meta["crc32"]:
                raise CacheError(f"{fname} checksum {crc} != manifest {meta['crc32']} (corrupted)")
        _VERIFIED[os.path.abspath(directory)] = stats
    out: dict[str, dict[str, np.ndarray]] = {}
    for fname, meta in files.items():
        split, field, _ = fname.split(".")
        try:
            array = np.load(os.path.join(directory, fname), mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise CacheError(f"{fname}: {err}") from err
        if list(array.shape) != meta["shape"] or array.dtype.str != meta["dtype"]:
            raise CacheError(f"{fname}: shape/dtype {array.shape}/{array.dtype.str} != manifest")
        out.setdefault(split, {})[field] = array
    return out


class CacheError(RuntimeError):
    """A cache entry is incomplete or corrupted."""


def read_notes(directory: str) -> dict[str, Any]:
    """The builder's notes stored in an entry's manifest (empty when none)."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f).get("notes", {}) or {}
    except (OSError, ValueError):
        return {}


def load_or_build(cache_dir: str | None, name: str, settings: dict[str, Any],
                  build: Callable[[], dict[str, dict[str, np.ndarray]]],
                  notes: Callable[[], dict[str, Any]] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Return the cached arrays for ``(name, settings)``, building and caching them with ``build()`` on a miss.

    ``notes()`` (called after ``build()``) gives the notes stored with the entry. Concurrent callers build an entry
    once: the first takes ``<entry>.lock`` and builds, the others wait and load its result. A corrupted or
    truncated entry is reported with a warning, removed and rebuilt (under the same lock).
    """
    directory = entry_dir(cache_dir, name, settings)
    if os.path.isdir(directory):
        try:
            return load_entry(directory)
        except CacheError:
            pass  # re-checked and rebuilt under the lock below
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    lock = FileLock(directory + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", directory)
        lock.acquire()
    try:
        if os.path.isdir(directory):
            try:
                return load_entry(directory)
            except CacheError as err:
                warnings.warn(f"cache entry {directory} is invalid ({err}); rebuilding it", RuntimeWarning,
                              stacklevel=2)
                # Move aside first so a reader that has not taken the lock never sees a half-deleted entry.
                trash = f"{directory}.bad-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(directory, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                except OSError:
                    shutil.rmtree(directory, ignore_errors=True)
                _VERIFIED.pop(os.path.abspath(directory), None)
        arrays = build()
        save_entry(directory, arrays, settings, notes() if notes is not None else None)
    finally:
        lock.release()
    return load_entry(directory)
