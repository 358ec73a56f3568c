"""The allocator peak of one CPU step, read from ``torch.profiler`` memory events.

One definition for the contract check (:mod:`attentions.testing`, which may import nothing outside
``attentions``) and the harness's measurements (``harness/measure.py``), so both read the same figure.
Process RSS is never used: it counts the interpreter and cached pages and does not fall when tensors
are freed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def cpu_step_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()`` once under the profiler; return its result and the peak bytes it allocated.

    The peak is the largest running sum of CPU allocations (+) and frees (-) in time order. Memory
    allocated before ``fn`` does not count, and neither does its free inside ``fn`` (the profiler cannot
    see the matching allocation), so for steps that free older memory the figure is an upper bound of
    the live-bytes peak.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with native_stderr_silenced():  # kineto prints a line on each start and stop
        prof.start()
    try:
        result = fn()
    finally:
        with native_stderr_silenced():
            prof.stop()
    return result, _peak_of_profile(prof)


def _peak_of_profile(prof: Any) -> int:
    """Largest running sum of this profile's CPU alloc/free events, in the order they happened.

    A free counts only when its block was allocated during this profile (matched by address). The
    profiler's CPU reporter remembers the size of every block it saw allocated until that block is
    freed *while* profiling; a block allocated under an earlier profile and freed after it stopped
    leaves a stale size behind, and a later unrelated block at the same address would then report
    that size when freed (the allocator reuses addresses). Matching frees to this profile's own
    allocations makes the figure independent of earlier measurements.
    """
    events = []
    for event in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        fields = event.extra_fields
        if not hasattr(fields, "alloc_size") or fields.device.type != "cpu":  # allocation events only
            continue
        events.append((event.start_time_ns, int(fields.alloc_size), int(fields.ptr)))
    events.sort(key=lambda e: e[0])  # the stable sort keeps same-timestamp events in emission order
    live: set[int] = set()
    running = peak = 0
    for _, nbytes, ptr in events:
        if nbytes > 0:
            live.add(ptr)
        elif ptr in live:
            live.discard(ptr)
        else:
            continue  # a block allocated before this profile started: its free is not ours to count
        running += nbytes
        peak = max(peak, running)
    return peak


def _walk(events: Any) -> Iterator[Any]:
    """Every event of the profiler's event tree, depth first."""
    for event in events:
        yield event
        yield from _walk(event.children)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the duration (Python exceptions still propagate)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
