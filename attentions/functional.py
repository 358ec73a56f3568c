"""Small shared helpers: the dense reference softmax attention and mask utilities."""

from __future__ import annotations

import math

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Plain ``softmax(q k^T / sqrt(d)) v`` with an optional boolean ``allowed`` mask.

    ``allowed`` broadcasts to ``(batch, heads, n_q, n_k)``; ``True`` = the query may
    attend to the key. A query row with no allowed key outputs zeros. This materialises
    the ``n_q x n_k`` score matrix: it is the ground truth of the tests, not a fast path.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        # Rows with every key disallowed are all -inf -> NaN; define them as zero.
        probs = torch.nan_to_num(probs, nan=0.0)
    if dropout > 0.0 and training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def causal_allowed(seq: int, device: torch.device | None = None) -> torch.Tensor:
    """``(seq, seq)`` lower-triangular allowed mask: query ``i`` may attend to key ``j`` iff ``j <= i``."""
    pos = torch.arange(seq, device=device)
    return pos[None, :] <= pos[:, None]


def is_right_padded(key_padding_mask: torch.Tensor) -> bool:
    """Whether every row of a ``(batch, seq)`` real-token mask is real tokens then padding (no gap)."""
    return bool((key_padding_mask[:, 1:] <= key_padding_mask[:, :-1]).all())


def key_padding_to_allowed(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(batch, seq)`` real-token mask -> ``(batch, 1, 1, seq)`` allowed mask."""
    if key_padding_mask is None:
        return None
    return key_padding_mask[:, None, None, :]


def zero_padded_values(v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions of a ``(batch, heads, seq, dim)`` tensor.

    Guards against NaN/Inf standing in padded slots: ``0 * nan`` is still NaN, so
    mechanisms that weight values by zero must also replace them.
    """
    if key_padding_mask is None:
        return v
    return v.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


def repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped keys or values ``(batch, kv_heads, seq, dim)`` -> ``(batch, kv_heads * groups, seq, dim)``: key-value
    head ``j`` repeated for its ``groups`` consecutive query heads (a copy; ``t`` itself when ``groups == 1``)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)
