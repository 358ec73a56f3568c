"""The fairness protocol's fields: what a bench cell and a peer record say about how they were measured.

docs/FAIRNESS.md defines each field in words; these functions write them, in the same words for ours and the
peers, into every ``bench`` cell and ``peer`` record (``protocol``, and ``peer_protocol`` for the peer's side),
so that a reader of a record never has to guess what its number timed.

Owns: the protocol's field names and texts. Imports: ``torch`` (threads) only; the callers hand in the rest.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch

PROJECTED = "q, k, v of shape (batch, heads, n, head_dim), already projected"
LAYER = "x of shape (batch, n, heads * head_dim); Q/K/V and output projections inside the measured step"
NO_MASK = "none: no key padding mask is passed"
CAUSAL_OWN = "causal: each implementation's own causal form, built inside the measured step where it builds one"
TIMING = ("median of `repeats` timed steps after `warmup` untimed ones, in interleaved rounds with the other "
          "implementations measured at the same n (round-robin), the device synchronised before each clock read")
MEMORY = ("allocator peak of one more step above what was allocated when it began (CPU: torch.profiler alloc "
          "events; CUDA: max_memory_allocated); gradients of the inputs and parameters cleared outside it")
DROPOUT = ("eval(): attention dropout off in the measured step for ours and the peer alike; in training, ours "
           "applies dropout inside its own path and keeps its memory floor (docs/FAIRNESS.md)")
PASS = "fwd: forward under no_grad; fwd+bwd: forward, then out.sum().backward()"


def protocol(*, layout: str, masks: str, backend: str, warmup: int, repeats: int, cpu_allocator: str,
             pass_: str) -> dict[str, Any]:
    """The protocol fields of one measured implementation (ours or a peer), every one a plain JSON value."""
    return {
        "layout": layout, "masks": masks, "backend": backend, "pass": pass_, "pass_means": PASS,
        "warmup": int(warmup), "repeats": int(repeats), "timing": TIMING, "memory": MEMORY,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "cpu_allocator": cpu_allocator, "mode": "eval", "dropout_policy": DROPOUT,
    }


def mask_text(causal: bool) -> str:
    """What masks a cell passes: none, or each implementation's own causal form."""
    return CAUSAL_OWN if causal else NO_MASK


def module_settings(module: torch.nn.Module) -> dict[str, Any]:
    """The scalar settings a module keeps as attributes (features, buckets, window, heads, ...), as built: the
    pair's settings read from the peer itself, not from what we asked for. ``training`` is left out."""
    return {k: v for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a PyPI name, e.g. ``performer-pytorch``), None if unknown."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
