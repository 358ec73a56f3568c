"""Exact softmax attention with dropout, over query chunks, recomputed in backward: ``full``'s CPU training path.

Why it exists: with ``dropout > 0`` in training, PyTorch's CPU SDPA leaves its fused (flash) kernel for the
math path, which stores the ``n x n`` probabilities and the dropout mask (4.1 GB at n = 4096, batch 8, 2 heads,
head dim 8, against 17.5 MiB in eval mode; issue 23). This path keeps only O(n d) tensors for backward:
``q, k, v``, the output and each row's log-sum-exp. Each query chunk's scores and probabilities exist only
while that chunk is computed (forward) or recomputed (backward), and its dropout mask is rebuilt from
``(seed, chunk index)`` by :mod:`attentions._dropout`, never stored. The backward is FlashAttention's
(Dao et al. 2022, Algorithm 4, with ``D_i = dO_i . O_i``, which holds with dropout too).

Masks: ``key_padding_mask`` ``(batch, n)`` bool, True = real key, and/or ``causal`` (query ``i`` sees keys
``j <= i``). A query row with no allowed key attends to every key instead (as ``full``'s SDPA path does for an
all-padding sequence): its output is padding and stays finite.

Grouped-query attention: ``k``, ``v`` may have ``kv_heads`` heads dividing the ``heads`` of ``q``, key-value head
``j`` serving the ``g`` consecutive query heads ``j g .. j g + g - 1``. Each chunk folds the ``g`` query heads of a
group into the rows of one product against its key-value head (:func:`_fold`: ``(batch, kv_heads, g rows, d)``
times ``(batch, kv_heads, d, n)``), so k and v are read once per group and never repeated; the gradients of k and v
sum over the group inside the same products. Scores, dropout masks and log-sum-exps keep the ungrouped layout
``(batch, heads, rows, n)`` (the folded product is that tensor, viewed), so a grouped call draws exactly the
dropout masks of an ungrouped call on the key-value heads repeated.

Chunking: :func:`chunk_rows` picks the number of query rows per chunk from the shape alone, so that a chunk's
``(batch, heads, rows, n)`` score tensor holds about :data:`CHUNK_ELEMENTS` numbers (4 MiB in float32) and
backward rebuilds the chunks (and their masks) that forward drew.
"""

from __future__ import annotations

import math

import torch

from ._dropout import apply_dropout, keep_mask

CHUNK_ELEMENTS = 1 << 20  # scores per chunk: (batch, heads, rows, n) ~ 1M numbers, 4 MiB in float32


def chunk_rows(batch: int, heads: int, n_q: int, n_k: int, elements: int | None = None) -> int:
    """Query rows per chunk for ``(batch, heads, n_q, head_dim)`` queries on ``n_k`` keys (at least 1), so that a
    chunk holds about ``elements`` scores (None: :data:`CHUNK_ELEMENTS`)."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    return max(1, min(n_q, elements // max(1, batch * heads * n_k)))


def _allowed(key_padding_mask: torch.Tensor | None, causal: bool, start: int, stop: int, n_k: int,
             device: torch.device) -> torch.Tensor | None:
    """``(batch or 1, 1, stop - start, n_k)`` bool allowed mask of query rows ``start:stop``, or None (no mask);
    a row with no allowed key allows every key."""
    allowed = None
    if causal:
        rows = torch.arange(start, stop, device=device)[:, None]
        allowed = (torch.arange(n_k, device=device)[None, :] <= rows)[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    if allowed is None:
        return None
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(batch, heads, rows, m)`` -> ``(batch, kv_heads, (heads / kv_heads) rows, m)``: the rows of the query heads of
    one key-value head side by side (a view of a contiguous ``x``, else a copy of this chunk)."""
    batch, heads, rows, m = x.shape
    return x.reshape(batch, kv_heads, (heads // kv_heads) * rows, m)


def _times(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` per query head, ``x`` ``(batch, heads, rows, m)``, ``y`` ``(batch, kv_heads, m, p)`` shared by the
    group of query heads of each key-value head: ``(batch, heads, rows, p)``, one product per key-value head."""
    batch, heads, rows, _ = x.shape
    return torch.matmul(_fold(x, y.shape[1]), y).view(batch, heads, rows, y.shape[-1])


def _group_sum(x: torch.Tensor, y: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``x^T @ y`` summed over each key-value head's query heads: ``x`` ``(batch, heads, rows, n)``, ``y`` ``(batch,
    heads, rows, d)`` -> ``(batch, kv_heads, n, d)`` (a key's or value's gradient, one product per key-value head)."""
    return torch.matmul(_fold(x, kv_heads).transpose(-2, -1), _fold(y, kv_heads))


def _scores(q_c: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    scores = _times(q_c, k.transpose(-2, -1)).mul_(scale)
    if allowed is not None:
        scores = scores.masked_fill_(~allowed, float("-inf"))
    return scores


class _Dropped:
    """Applies chunk ``part``'s dropout (the mask :func:`attentions._dropout.apply_dropout` draws for
    ``(seed, part)`` and ``like``'s shape), drawing the mask once for several tensors of that shape."""

    def __init__(self, seed: int, part: int, p: float, like: torch.Tensor) -> None:
        self.p = p
        self.dropped = None if p == 0.0 else ~keep_mask(seed, part, like.shape, p, like.device)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.dropped is None:
            return t
        return t.masked_fill(self.dropped, 0.0).mul_(1.0 / (1.0 - self.p))


class ChunkedSoftmaxAttention(torch.autograd.Function):
    """``softmax(q k^T / sqrt(d) + mask)`` with dropout ``p`` (masks from ``seed``) times ``v``.

    ``q``: ``(batch, heads, n, d)``; ``k, v``: ``(batch, kv_heads, n, d)``, ``kv_heads`` dividing ``heads`` (grouped
    query heads, module docstring), one dtype; returns ``(batch, heads, n, d)``. ``seed`` is an int
    (:func:`attentions._dropout.draw_seed`), ignored when ``p == 0``.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, causal: bool, p: float, seed: int, chunk_elements: int | None):
        batch, heads, n_q, d = q.shape
        n_k = k.shape[-2]
        scale = 1.0 / math.sqrt(d)
        rows = chunk_rows(batch, heads, n_q, n_k, chunk_elements)
        out = torch.empty_like(q)
        lse = q.new_empty(batch, heads, n_q)
        for part, start in enumerate(range(0, n_q, rows)):
            stop = min(start + rows, n_q)
            allowed = _allowed(key_padding_mask, causal, start, stop, n_k, q.device)
            scores = _scores(q[:, :, start:stop], k, allowed, scale)
            lse[:, :, start:stop] = torch.logsumexp(scores, dim=-1)
            probs = scores.sub_(lse[:, :, start:stop, None]).exp_()
            out[:, :, start:stop] = _times(apply_dropout(probs, seed, part, p), v)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.p, ctx.seed, ctx.rows = causal, p, seed, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        n_q, d = q.shape[-2:]
        kv_heads, n_k = k.shape[1], k.shape[-2]
        scale = 1.0 / math.sqrt(d)
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(dim=-1)  # D_i = dO_i . O_i = sum_j P_ij dP_ij (dropout included)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for part, start in enumerate(range(0, n_q, ctx.rows)):
            stop = min(start + ctx.rows, n_q)
            allowed = _allowed(key_padding_mask, ctx.causal, start, stop, n_k, q.device)
            q_c, do_c = q[:, :, start:stop], grad_out[:, :, start:stop]
            probs = _scores(q_c, k, allowed, scale).sub_(lse[:, :, start:stop, None]).exp_()
            # The forward's mask of this chunk, drawn once here for both uses (the draw is the costly part).
            drop = _Dropped(ctx.seed, part, ctx.p, probs)
            dv += _group_sum(drop(probs), do_c, kv_heads)
            # dP = (dO V^T) through the same mask and 1/(1-p) scaling the forward applied.
            dprobs = drop(_times(do_c, v.transpose(-2, -1)))
            dscores = probs.mul_(dprobs.sub_(delta[:, :, start:stop, None])).mul_(scale)
            dq[:, :, start:stop] = _times(dscores, k)
            dk += _group_sum(dscores, q_c, kv_heads)
        return dq, dk, dv, None, None, None, None, None


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                      causal: bool, p: float, seed: int, chunk_elements: int | None = None) -> torch.Tensor:
    """:class:`ChunkedSoftmaxAttention` applied (see there for shapes and masks); ``chunk_elements``: scores per
    chunk (None: :data:`CHUNK_ELEMENTS`)."""
    return ChunkedSoftmaxAttention.apply(q, k, v, key_padding_mask, causal, p, seed, chunk_elements)


def chunked_attention_stored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_padding_mask: torch.Tensor | None, causal: bool, p: float, seed: int,
                             chunk_elements: int | None = None) -> torch.Tensor:
    """The same computation as :func:`chunked_attention` (the same chunks, hence the same dropout masks from
    ``seed``) left to autograd, which keeps each chunk's probabilities and mask: a mechanism's stored form
    (``recompute=False``), against which its recomputing path is tested."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[-2]
    rows = chunk_rows(batch, heads, n_q, n_k, chunk_elements)
    outs = []
    for part, start in enumerate(range(0, n_q, rows)):
        stop = min(start + rows, n_q)
        allowed = _allowed(key_padding_mask, causal, start, stop, n_k, q.device)
        probs = torch.softmax(_scores(q[:, :, start:stop], k, allowed, 1.0 / math.sqrt(d)), dim=-1)
        outs.append(_times(apply_dropout(probs, seed, part, p), v))
    return torch.cat(outs, dim=2)
