"""CPU allocator policy for benchmarks: ``default`` (as the process started) or ``reuse``.

glibc's malloc serves every buffer above its mmap threshold (up to 32 MB, adaptive) with a fresh ``mmap`` and
returns it to the OS on ``free``. A CPU attention step at large n allocates such buffers every call, so its time
includes page faults that grow with the bytes touched: a 2K->16K time slope of 1.3 where the arithmetic is linear.
``reuse`` turns that off with ``mallopt`` (no mmapped chunks, no trimming), so freed memory is reused and the
times measure the mechanism. It is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do at start-up.

The policy changes timings only: peak memory is read from torch's allocator events either way. It is recorded
with every benchmark cell and is part of the cell's key, so cells measured under different policies never mix.
It is process-wide and cannot be undone in-process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CPU_ALLOCATORS = ("default", "reuse")
# The environment variables glibc reads at start-up for the same knobs; a run started with them is "reuse" too.
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
_REUSE = "reuse:mallopt(M_MMAP_MAX=0,M_TRIM_THRESHOLD=2^31-1)"
# ``reuse`` cannot be undone in-process: once applied, every later run of the process measures under it.
_applied: list[str] = []


def describe_cpu_allocator(env: dict[str, str] | None = None) -> str:
    """``default``, or the malloc environment variables the process was started with (they change timings)."""
    env = os.environ if env is None else env
    set_vars = [f"{k}={env[k]}" for k in MALLOC_ENV if env.get(k)]
    return "env:" + ",".join(set_vars) if set_vars else "default"


def configure_cpu_allocator(mode: str) -> str:
    """Apply ``mode`` to this process and return the description recorded with the results.

    ``default`` changes nothing (it returns the malloc environment, if any, or ``reuse``'s description when an
    earlier call in this process applied it: the policy in force is what gets recorded). ``reuse`` needs glibc
    (Linux); elsewhere it raises ``ValueError`` rather than measuring something other than what was asked for.
    """
    if mode not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {mode!r}")
    if _applied:
        return _applied[0]
    if mode == "default":
        return describe_cpu_allocator()
    mallopt = _glibc_mallopt()
    if mallopt is None:
        raise ValueError("cpu_allocator=reuse needs glibc's mallopt (Linux); this platform has none. "
                         "Use cpu_allocator=default (timings then include the OS allocator's page faults).")
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)):
        raise RuntimeError("cpu_allocator=reuse: glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD")
    _applied.append(_REUSE)
    return _REUSE


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has no mallopt knobs that matter here)
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
