"""Blocked computation shared by the sparse-pattern mechanisms (sliding_window, longformer, bigbird).

The sequence is cut into query blocks of ``block`` tokens. Each query block gathers a small,
fixed-size set of keys (neighbouring blocks, random blocks, global tokens) into one tensor of
``K`` keys, so scores are ``(batch, heads, blocks, block, K)``: memory ``O(n K)``, never ``n x n``.
Which (query, key) pairs are allowed is decided from absolute key positions, one table of
shape ``(blocks, K)`` per call, so every mechanism states its pattern in plain position terms.

Key slots that fall outside the sequence (before position 0, in the internal padding after the
last real position, or an unused random slot) carry position ``-1`` or ``>= n`` and are masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Position of a key slot that holds no key (an unused random block, say).
NO_KEY = -1


def num_blocks(n: int, block: int) -> int:
    """Blocks of ``block`` tokens needed to cover ``n`` tokens."""
    return -(-n // block)


def to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(batch, heads, n, d)`` -> ``(batch, heads, blocks, block, d)``, zero-padded at the end."""
    batch, heads, n, d = x.shape
    pad = num_blocks(n, block) * block - n
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(batch, heads, -1, block, d)


def band_blocks(xb: torch.Tensor, m: int, right: int | None = None) -> torch.Tensor:
    """Each block followed by its neighbours: block ``i`` gets blocks ``i-m .. i+right`` side by side.

    ``right`` defaults to ``m`` (a symmetric band); ``right=0`` is the causal band (past blocks only).
    ``(batch, heads, blocks, block, d)`` -> ``(batch, heads, blocks, (m+right+1) block, d)``; blocks
    beyond either end are zeros (their positions are masked by :func:`band_positions`). An
    overlapping ``unfold`` view made contiguous once: its backward is one fold kernel, where
    m+right+1 concatenated slices would each zero-fill a full-size gradient.
    """
    right = m if right is None else right
    if m == 0 and right == 0:
        return xb
    batch, heads, nb, block, d = xb.shape
    flat = F.pad(xb.reshape(batch, heads, nb * block, d), (0, 0, m * block, right * block))
    windows = flat.unfold(2, (m + right + 1) * block, block)  # (batch, heads, nb, d, (m+right+1) block)
    return windows.transpose(-1, -2).contiguous()


def band_positions(nb: int, block: int, m: int, device: torch.device, right: int | None = None) -> torch.Tensor:
    """Absolute key positions of :func:`band_blocks` slots: ``(blocks, (m+right+1) block)``, may be < 0 or >= n."""
    right = m if right is None else right
    starts = (torch.arange(nb, device=device)[:, None] + torch.arange(-m, right + 1, device=device)[None, :]) * block
    return (starts[:, :, None] + torch.arange(block, device=device)).reshape(nb, -1)


def causal_keys(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Causal part of a blocked pattern: ``(blocks, block, K)``, True where key position <= query position.

    ``query_pos``: ``(blocks, block)`` absolute query positions; ``key_pos``: ``(blocks, K)`` key slot positions.
    """
    return key_pos[:, None, :] <= query_pos[:, :, None]


def select_blocks(xb: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Key blocks picked per query block: ``index`` ``(rows, r)`` of block numbers, ``NO_KEY`` allowed.

    Returns ``(batch, heads, rows, r * block, d)``; a ``NO_KEY`` slot holds block 0's contents and
    must be masked by the caller (its positions from :func:`block_positions` are ``NO_KEY``).
    """
    batch, heads, _, block, d = xb.shape
    rows, r = index.shape
    picked = xb.index_select(2, index.clamp(min=0).reshape(-1))
    return picked.view(batch, heads, rows, r * block, d)


def block_positions(index: torch.Tensor, block: int) -> torch.Tensor:
    """Absolute key positions of :func:`select_blocks` slots: ``(rows, r * block)``; ``NO_KEY`` stays ``NO_KEY``."""
    pos = index[:, :, None] * block + torch.arange(block, device=index.device)
    pos = torch.where(index[:, :, None] < 0, torch.full_like(pos, NO_KEY), pos)
    return pos.reshape(index.shape[0], -1)


def key_exists(positions: torch.Tensor, n: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """True where a slot holds a real key: ``0 <= pos < n`` and not padding.

    ``positions`` is any long tensor of key positions; the result has a leading batch dimension
    (size 1 without a padding mask) followed by ``positions.shape``.
    """
    inside = (positions >= 0) & (positions < n)
    if key_padding_mask is None:
        return inside[None]
    real = key_padding_mask[:, positions.clamp(0, n - 1)]
    return real & inside[None]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two dims with a boolean ``allowed`` mask.

    ``q``: ``(..., Q, d)``, ``k``/``v``: ``(..., K, d)``, ``allowed`` broadcasts to ``(..., Q, K)``.
    Disallowed keys get exactly zero weight; a row with no allowed key outputs zeros and passes
    zero gradient back. ``dropout`` drops attention probabilities in training mode.

    A hand-written backward keeps only the probabilities and computes the score gradient in
    place (as FlashAttention does, with ``rowsum(dP * P) = rowsum(dO * O)``), skipping the
    masking and softmax-backward passes and temporaries that autograd would make over ``(Q, K)``
    tensors. Not twice differentiable.
    """
    p = dropout if training else 0.0
    return _MaskedAttention.apply(q, k, v, allowed, p)


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allowed, dropout):
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if allowed is not None:
            # The lowest finite value, not -inf: a row with no allowed key stays finite (uniform),
            # and is zeroed below; elsewhere exp(min - rowmax) is exactly 0.
            scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = None
        if dropout > 0.0:
            keep = torch.rand_like(probs) >= dropout
            out = torch.matmul(probs * keep / (1.0 - dropout), v)
        else:
            out = torch.matmul(probs, v)
        empty = None
        if allowed is not None:
            empty = ~allowed.any(dim=-1, keepdim=True)
            if not bool(empty.any()):
                empty = None
        ctx.save_for_backward(q, k, v, probs, out, keep, empty)
        ctx.scale, ctx.dropout = scale, dropout
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, probs, out, keep, empty = ctx.saved_tensors
        scale, dropout = ctx.scale, ctx.dropout
        # A loss like out.sum() hands back an expanded gradient with zero strides, which sends
        # matmul down a path hundreds of times slower than BLAS.
        grad_out = grad_out.contiguous()
        if empty is not None:
            grad_out = grad_out.masked_fill(empty, 0.0)
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1))
        if keep is None:
            grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
        else:
            grad_v = torch.matmul((probs * keep / (1.0 - dropout)).transpose(-2, -1), grad_out)
            grad_probs.mul_(keep).mul_(1.0 / (1.0 - dropout))
        # Softmax backward in place: dS = P * (dP - rowsum(dP * P)), rowsum(dP * P) = rowsum(dO * O).
        delta = (grad_out * out).sum(dim=-1, keepdim=True)
        grad_scores = grad_probs.sub_(delta).mul_(probs)
        grad_q = torch.matmul(grad_scores, k).mul_(scale)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(scale)
        return _unbroadcast(grad_q, q), _unbroadcast(grad_k, k), _unbroadcast(grad_v, v), None, None


def _unbroadcast(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``grad`` over the dimensions that matmul broadcast ``like`` along."""
    if grad.shape == like.shape:
        return grad
    extra = grad.dim() - like.dim()
    if extra:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, like.shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad
