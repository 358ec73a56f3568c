"""Attention dropout whose mask is regenerated, not stored: for recomputing (chunked) paths.

A recomputing path keeps only O(n d) tensors for backward and rebuilds each chunk's probabilities there.
Its dropout mask must then be rebuilt too, bit for bit: the mask of chunk ``part`` is drawn from a generator
seeded with ``(seed, part)``, where ``seed`` is drawn once per call from the global RNG (so a run stays
reproducible from its seed and resumable from its RNG state). Storing the mask instead would cost a byte
per score, the very ``n x w`` (or ``n x n``) tensor the path exists to avoid.

The dropout policy (docs/FAIRNESS.md): every mechanism applies ``dropout`` to its attention probabilities in
training mode, inside its own path, and keeps its memory floor while doing so.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, part) pairs apart
_MASK63 = (1 << 63) - 1


def draw_seed() -> int:
    """A fresh 62-bit seed from the global CPU RNG (call once per forward, save it in ``ctx``)."""
    return int(torch.randint(0, 1 << 62, (1,)).item())


def keep_mask(seed: int, part: int, shape: tuple[int, ...] | torch.Size, p: float,
              device: torch.device | str) -> torch.Tensor:
    """Bool tensor of ``shape``: True where a probability is kept (probability ``1 - p``).

    The same ``(seed, part, shape, p, device)`` always gives the same mask, so a backward pass can
    rebuild what its forward drew. Raises ValueError for ``p`` outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * _MIX + part + 1) & _MASK63)
    return torch.rand(shape, generator=generator, device=device) >= p


def apply_dropout(probs: torch.Tensor, seed: int, part: int, p: float) -> torch.Tensor:
    """``probs`` with the ``(seed, part)`` mask applied and the kept entries scaled by ``1 / (1 - p)``
    (inverted dropout, as ``torch.nn.functional.dropout``). ``p == 0`` returns ``probs`` itself."""
    if p == 0.0:
        return probs
    keep = keep_mask(seed, part, probs.shape, p, probs.device)
    return probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))
