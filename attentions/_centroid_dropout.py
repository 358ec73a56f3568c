"""Clustered attention's centroid attention with dropout, recomputed in backward (issue 23's dropout policy).

Without dropout the centroid attention runs in PyTorch's fused SDPA kernel, which never keeps the ``(C, n)``
probabilities. With ``dropout_p > 0`` on a CPU, SDPA leaves that kernel for its math path, which keeps the
scores, the probabilities and the mask: 58 MiB against 13 MiB at n = 4096 (benchmark setting, 100 clusters).
Here the centroids are taken a few rows at a time (a *chunk*, about :data:`CHUNK_ELEMENTS` scores), each
chunk's mask is :func:`attentions._dropout.apply_dropout` of part = chunk index, and backward rebuilds the
chunk's probabilities from the saved log-normalisers: kept for backward are the inputs, the ``(C, d)`` output
and a ``(C,)`` logsumexp per (batch, head), never a ``(C, n)`` tensor.

:func:`centroid_attention_stored` is the same computation left to autograd (the stored form, ``recompute=False``):
the same chunks and masks, so both give the same result from the same seed.

Shapes: ``centroids (b, h, C, d)``, ``k, v (b, h, n, d)``, ``allowed (b, n)`` bool (keys that may be attended)
or None. Scores are ``centroid . k / sqrt(d)``.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._dropout import apply_dropout

CHUNK_ELEMENTS = 1 << 18  # scores per chunk: 1 MiB in float32


def _chunks(centroids: torch.Tensor, k: torch.Tensor) -> list[tuple[int, int]]:
    """Centroid-row ranges ``[a, e)`` of about :data:`CHUNK_ELEMENTS` scores each; chunk i is dropout part i."""
    batch, heads, rows, _ = centroids.shape
    step = max(1, CHUNK_ELEMENTS // (batch * heads * k.shape[2]))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _scores(centroids: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(centroids * (1.0 / math.sqrt(centroids.shape[-1])), k.transpose(-1, -2))
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return scores


def centroid_attention_stored(centroids, k, v, allowed, p: float, seed: int) -> torch.Tensor:
    """``softmax(scores)`` with the chunks' dropout masks, ``@ v``, through autograd (it keeps each chunk's
    probabilities and mask for backward)."""
    outs = []
    for part, (a, e) in enumerate(_chunks(centroids, k)):
        probs = torch.softmax(_scores(centroids[:, :, a:e], k, allowed), dim=-1)
        outs.append(torch.matmul(apply_dropout(probs, seed, part, p), v))
    return torch.cat(outs, dim=2)


class CentroidAttention(torch.autograd.Function):
    """``CentroidAttention.apply(centroids, k, v, allowed, p, seed)`` -> ``(b, h, C, d)``: see the module docstring."""

    @staticmethod
    def forward(ctx, centroids, k, v, allowed, p: float, seed: int):
        out = torch.empty_like(centroids)
        lse = centroids.new_empty(centroids.shape[:-1])
        for part, (a, e) in enumerate(_chunks(centroids, k)):
            scores = _scores(centroids[:, :, a:e], k, allowed)
            chunk_lse = torch.logsumexp(scores, dim=-1)
            probs = scores.sub_(chunk_lse[..., None]).exp_()
            out[:, :, a:e] = torch.matmul(apply_dropout(probs, seed, part, p), v)
            lse[:, :, a:e] = chunk_lse
        ctx.save_for_backward(centroids, k, v, out, lse)
        ctx.allowed, ctx.p, ctx.seed = allowed, p, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        centroids, k, v, out, lse = ctx.saved_tensors
        p, seed, scale = ctx.p, ctx.seed, 1.0 / math.sqrt(centroids.shape[-1])
        delta = (grad_out * out).sum(dim=-1)  # rowsum(dO * O): the softmax backward's correction
        d_centroids = torch.empty_like(centroids)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for part, (a, e) in enumerate(_chunks(centroids, k)):
            g = grad_out[:, :, a:e]
            probs = _scores(centroids[:, :, a:e], k, ctx.allowed).sub_(lse[:, :, a:e, None]).exp_()
            dv += torch.matmul(apply_dropout(probs, seed, part, p).transpose(-1, -2), g)
            dp = apply_dropout(torch.matmul(g, v.transpose(-1, -2)), seed, part, p)  # the same mask and scale
            ds = probs.mul_(dp.sub_(delta[:, :, a:e, None]))
            d_centroids[:, :, a:e] = torch.matmul(ds, k).mul_(scale)
            dk += torch.matmul(ds.transpose(-1, -2), centroids[:, :, a:e]).mul_(scale)
        return d_centroids, dk, dv, None, None, None
