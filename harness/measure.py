"""Measurement utilities: allocator-level peak memory, wall-clock timing, device description.

Peak memory is what the *allocator* handed out during the measured step, above what was
already allocated when the step began, with the peak reset first (docs/DESIGN.md, "Measuring
honestly"). Process RSS is never used: it includes the interpreter, freed-but-cached
pages and other threads, and it does not go down when tensors are freed.

    out, reading = measure_peak_memory(lambda: attn(q, k, v), "cpu")
    print(reading.peak_bytes, reading.method)
    stats = time_fn(lambda: attn(q, k, v), "cpu", warmup=2, repeats=5)

It also owns the failure vocabulary every runner records (:func:`is_out_of_memory`,
:func:`failure_outcome`), the measured step of one callable (:func:`make_step`, :func:`measure_step`), several
steps timed in interleaved rounds (:func:`time_rounds`) and the small
helpers the benchmark and the peers share (:data:`DTYPES`, :func:`random_inputs`,
:func:`jsonable_params`, :func:`progress_bar`).

Owns: how a number is measured. Imports: torch, the standard library and the CPU allocator peak that
the contract check shares (``attentions._profile``); no other ``harness`` module, so every runner may
import it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from attentions._profile import cpu_step_peak

T = TypeVar("T")

CUDA_METHOD = "cuda.max_memory_allocated"
CPU_METHOD = "torch.profiler(cpu alloc events)"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class MemoryReading:
    """Peak bytes allocated above the baseline at entry, and the method that produced the figure."""

    peak_bytes: int
    method: str


def _as_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {str(device)!r}")
    return device


def check_device(requested: str) -> str:
    """The device to measure on: ``auto`` -> ``cuda`` when available, else ``cpu``; otherwise ``requested``
    itself, which must name a device available here.

    Raises ValueError for a malformed name or a CUDA device on a machine without CUDA (the wording of
    ``arena-train``'s check)."""
    requested = str(requested)
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"invalid 'device': {requested!r} ({exc}); allowed: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid 'device': cuda requested but torch.cuda.is_available() is False; use device=cpu")
    return requested


def measure_peak_memory(fn: Callable[[], T], device: torch.device | str) -> tuple[T, MemoryReading]:
    """Run ``fn()`` once and return its result with the allocator peak it caused.

    CUDA: ``reset_peak_memory_stats`` then ``max_memory_allocated - memory_allocated`` at entry.
    CPU: every allocation and free recorded by ``torch.profiler`` (``profile_memory=True``),
    summed in time order (alloc +, free -); the peak is the largest running sum, floored at 0.
    Memory allocated before ``fn`` does not count. On CPU the profiler cannot see frees of
    blocks allocated before it started, so freeing such memory inside ``fn`` does not lower
    the running sum: the CPU figure is then an upper bound of the live-bytes peak (CUDA's
    counter does see those frees). Measured steps that free only their own tensors (a
    forward+backward on inputs made beforehand) are unaffected.
    """
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        return result, MemoryReading(peak_bytes=max(int(peak), 0), method=CUDA_METHOD)

    result, peak = cpu_step_peak(fn)
    return result, MemoryReading(peak_bytes=peak, method=CPU_METHOD)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (a no-op on CPU) so a clock read means the work is done."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device | str, warmup: int = 2, repeats: int = 5
) -> dict[str, Any]:
    """Wall time of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    The device is synchronised before each start and end clock read. Returns
    ``{"median_s", "p10_s", "p90_s", "times_s"}`` (percentiles interpolated linearly).
    """
    _check_counts(warmup, repeats)
    device = _as_device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    return timing_stats([_timed_call(fn, device) for _ in range(repeats)])


def time_rounds(steps: Sequence[Callable[[], Any]], device: torch.device | str, warmup: int = 2,
                repeats: int = 5) -> list[dict[str, Any] | Exception]:
    """Wall time of several steps measured in interleaved rounds (round-robin).

    Each step gets its ``warmup`` untimed calls, then come ``repeats`` rounds, and in each round every step
    is timed once, in turn. A burst of load from another process then slows the same round of every step
    instead of every repeat of one step: the rounds of a cell disagree, which shows (a cell measured in
    one contiguous block through the burst would look steady and slow). ``times_s`` is in round order.

    Returns one entry per step: the :func:`time_fn` dict, or the exception the step raised (a failing
    step is left out of the later rounds; the others go on). Raises ValueError for ``repeats < 1`` or
    ``warmup < 0``.
    """
    _check_counts(warmup, repeats)
    device = _as_device(device)
    failed: dict[int, Exception] = {}
    times: list[list[float]] = [[] for _ in steps]

    def run(i: int, timed: bool) -> None:
        if i in failed:
            return
        try:
            if timed:
                times[i].append(_timed_call(steps[i], device))
            else:
                steps[i]()
        except Exception as exc:  # noqa: BLE001 - one step's failure is its result, not the others'
            failed[i] = exc

    for i in range(len(steps)):
        for _ in range(warmup):
            run(i, timed=False)
    synchronize(device)
    for _ in range(repeats):
        for i in range(len(steps)):
            run(i, timed=True)
    return [failed[i] if i in failed else timing_stats(times[i]) for i in range(len(steps))]


def timing_stats(times: list[float]) -> dict[str, Any]:
    """``{"median_s", "p10_s", "p90_s", "times_s"}`` of a non-empty list of times in seconds."""
    return {"median_s": statistics.median(times), "p10_s": percentile(times, 10),
            "p90_s": percentile(times, 90), "times_s": list(times)}


def _check_counts(warmup: int, repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def _timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, the device synchronised before each clock read."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_flops_per_s(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
    """This machine's sustained matrix-multiply rate in FLOP/s: the fastest of 3 timed products of two
    1024 x 1024 matrices of ``dtype`` on ``device`` (after an untimed one), with torch's current number of
    threads. What a training estimate divides its FLOPs by (``arena-train`` on a CPU, ``arena-suite size=lra``).

    Raises ValueError for a device that is not ``cpu`` or ``cuda[:i]``."""
    size = 1024
    device = _as_device(device)
    gen = torch.Generator().manual_seed(0)  # never the global RNG: measuring must not move a run's random state
    a = torch.rand(size, size, generator=gen).to(device=device, dtype=dtype)
    stats = time_fn(lambda: a @ a, device, warmup=1, repeats=3)
    return 2 * size**3 / min(stats["times_s"])


def transformer_step_flops(*, embed_dim: int, qkv_dim: int, mlp_dim: int, num_layers: int, length: int,
                           sequences: int, attention_scores: bool = True) -> float:
    """A lower bound on the FLOPs of one training step of the backbone: 3x the forward's matrix multiplies
    (a backward costs about two forwards). Per layer and token: the q, k, v and output projections
    (4 embed x qkv multiply-adds) and the feed-forward (2 embed x mlp); with ``attention_scores``, full
    attention's scores and weighted sum (2 length x qkv). Embeddings, norms, softmax and heads are left out;
    2 FLOPs per multiply-add. ``sequences``: sequences per step (batch, twice the batch for a two-sequence task)."""
    per_token = 2 * (4 * embed_dim * qkv_dim + 2 * embed_dim * mlp_dim)
    if attention_scores:
        per_token += 4 * length * qkv_dim
    return 3.0 * num_layers * per_token * length * sequences


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a non-empty list, ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def device_info(device: torch.device | str) -> dict[str, Any]:
    """Where a number was measured: device name, torch version, threads, CPU count."""
    device = _as_device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cuda_version"] = torch.version.cuda
        info["total_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
    else:
        info["device_name"] = _cpu_name()
    return info


def command_line() -> str:
    """How this process was started, as a user would type it (``arena-bench seq_lens=[1024]``,
    ``python -m harness.train -m ...``); the report's summary lists these."""
    import sys

    argv = list(sys.argv) or ["?"]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # started with python -m <module>
        module = spec.name.removesuffix(".__main__")
        head = f"python -m {module}"
    else:
        head = os.path.basename(argv[0])
        head = f"python {head}" if head.endswith(".py") else head
    return " ".join([head, *argv[1:]])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ----------------------------------------------------------------------------------------------
# One measured step, and the outcome of a step that failed
# ----------------------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's 'can't allocate' RuntimeErrors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or any(
            s in text for s in ("out of memory", "can't allocate memory", "not enough memory")
        )
    return False


def failure_outcome(exc: BaseException) -> dict[str, Any]:
    """``{"outcome", "reason"}`` of a failed measurement: ``oom``, ``unsupported`` (a ValueError: the
    mechanism refused these inputs) or ``error`` (anything else, message kept, first line, 300 chars)."""
    if is_out_of_memory(exc):
        return {"outcome": "oom", "reason": f"out of memory: {_short(exc)}"}
    if isinstance(exc, ValueError):
        return {"outcome": "unsupported", "reason": _short(exc)}
    return {"outcome": "error", "reason": f"{type(exc).__name__}: {_short(exc)}"}


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def jsonable_params(params: dict) -> dict:
    """Constructor keywords as JSON values (tuples become lists), for records and cell keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def random_inputs(shape: tuple[int, ...], device: str, dtype: str, seed: int,
                  requires_grad: bool) -> list[torch.Tensor]:
    """Three N(0, 1) tensors of ``shape`` on ``device`` in ``dtype`` (a :data:`DTYPES` name), drawn on
    CPU from ``seed`` so every device sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[dtype]) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def make_step(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
              pass_: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, clear_grads): the measured step of ``forward`` (``fwd``: under no_grad; ``fwd+bwd``: plus
    ``out.sum().backward()``) and the function that drops the gradients of ``leaves``.

    ``leaves`` are the tensors whose gradients the step creates (inputs, parameters): a ``fwd+bwd`` step
    clears them first, so every step allocates its gradients afresh."""

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    def backward_step() -> None:
        clear_grads()
        forward().sum().backward()

    def forward_step() -> None:
        with torch.no_grad():
            forward()

    return (backward_step if pass_ == "fwd+bwd" else forward_step), clear_grads


def step_peak(step: Callable[[], Any], clear_grads: Callable[[], None], device: str) -> MemoryReading:
    """The allocator peak of one call of ``step`` (:func:`measure_peak_memory`), the gradients cleared before
    it, outside the measurement (the CPU profiler cannot see frees of memory allocated before it starts),
    and after it; on CUDA the cache is emptied afterwards. Raises what the step raises."""
    clear_grads()
    try:
        _, reading = measure_peak_memory(step, device)
    finally:
        release(clear_grads, device)
    return reading


def release(clear_grads: Callable[[], None], device: str) -> None:
    """After a measured step (or its failure): its gradients dropped, on CUDA the allocator's cache emptied."""
    clear_grads()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_step(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], pass_: str,
                 device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Time and peak memory of ``forward()`` (``fwd``, under no_grad) or of it plus ``out.sum().backward()``.

    ``leaves`` are the tensors whose gradients the step creates (inputs, parameters): they are
    cleared before each timed step and before the memory step, outside the measurement, so
    every measured step allocates its gradients afresh. Returns ``{"time": {median_s, p10_s,
    p90_s, times_s}, "memory": {peak_bytes, method}}``. Raises what the step raises.
    """
    step, clear_grads = make_step(forward, leaves, pass_)
    try:
        timing = time_fn(step, device, warmup=warmup, repeats=repeats)
    except BaseException:
        release(clear_grads, device)
        raise
    reading = step_peak(step, clear_grads, device)
    return {
        "time": {k: timing[k] for k in ("median_s", "p10_s", "p90_s", "times_s")},
        "memory": {"peak_bytes": reading.peak_bytes, "method": reading.method},
    }


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (disabled: a silent one with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)
