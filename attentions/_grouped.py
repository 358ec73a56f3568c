"""Grouped-query attention by rows: a key-value head's query heads read it as rows of one head.

Where every query row is independent given the keys (softmax over compressed or projected keys, centroid queries,
a decode step), the ``g = h / h_kv`` query heads that share key-value head ``j`` (heads ``j g .. j g + g - 1``,
:class:`attentions.AttentionConfig`) can be stacked along the row axis of head ``j``: one grouped matmul against
the ``h_kv`` heads' keys, nothing repeated (:func:`query_rows`); the output goes back with ``reshape(q.shape)``.
"""

from __future__ import annotations

import torch


def query_rows(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(b, h, n, d)`` -> ``(b, kv_heads, (h / kv_heads) n, d)``: the query heads ``j g .. j g + g - 1`` of key-value
    head ``j`` as ``g`` consecutive blocks of ``n`` rows (a view where q is contiguous); q itself when
    ``h == kv_heads``. ``reshape(b, h, n, d)`` undoes it."""
    b, h, n, d = q.shape
    return q if h == kv_heads else q.reshape(b, kv_heads, h // kv_heads * n, d)
