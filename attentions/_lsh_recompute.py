"""Reformer's LSH attention as one autograd function that rebuilds its chunk scores in backward (issue 23).

The stored form (``ReformerConfig.recompute=False``) keeps, for every hash round at once, the
``(b, h, rounds, chunks, c, 2c)`` probabilities, the gathered keys and values and the score bias: about
70 bytes per (query, key) pair, 285 MiB at n = 4096 in the benchmark's setting. This form keeps only
``O(n d + rounds n)`` for backward: the inputs ``q, k, v``, the output, each round's sort order and sorted
buckets, and per round and query the two parts of the round's log-normaliser (the row maximum ``top``
and the sum of exponentials after it, ``total``; their sum is the round's logsumexp). Forward and
backward both walk the rounds one at a time and each round a few chunks at a time (a *block*,
:data:`BLOCK_ELEMENTS` scores), rebuilding the block's scores, bias and pair counts from the indices.

Rounds are combined exactly as in the stored form: ``out = sum_r w_r o_r`` with ``w = softmax_r(lse_r)``,
accumulated round by round with a running maximum (an online softmax over the rounds). Backward uses
``w_r P_r = exp(s - LSE)``, the probability of a pair in the softmax over all rounds' windows, so the
score gradient of round r is ``w_r P_r * (dP - D)`` with ``dP = dout . v_j`` (times the dropout mask)
and ``D = dout . out`` (as FlashAttention's backward): no per-round output is kept.

Dropout: the mask of chunk ``j`` of round ``r`` is :func:`attentions._dropout.keep_mask` of part
``r * chunks + j`` and shape ``(b, h, c, 2c)``, drawn again in backward; the stored form draws the same
parts, so both forms give the same result from the same seed.

Shapes: ``q, k, v`` ``(b, h, n_pad, d)`` with ``n_pad`` a multiple of ``bucket_size``; index tensors
``(b, h, rounds, n_pad)``. Semantics (windows, bias values, counts) are those of
:class:`attentions.reformer.ReformerAttention`; its docstring is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ._dropout import keep_mask

# Scores per block (1 MiB in float32): small enough that a block's transients stay a few MiB, large
# enough that the per-block Python overhead is small against its work.
BLOCK_ELEMENTS = 1 << 18
KEY_EPS = 1e-6  # keys are k / max(|k|, KEY_EPS), as the stored form's F.normalize


@dataclass(frozen=True)
class LshPlan:
    """Everything about one call that is not a differentiable input: sort orders, buckets, settings.

    ``sort_idx``: token at each sorted slot, ``(b, h, rounds, n_pad)``; ``rank``: its inverse (slot of each
    token); ``buckets``: bucket of each token (``num_buckets`` for padding). Kept as int32 (they live until
    backward; a round's slice is widened to int64 where an index must be). ``self_value`` and
    ``mask_value`` are the additive biases of the self pair and of blocked pairs.
    """

    sort_idx: torch.Tensor
    rank: torch.Tensor
    buckets: torch.Tensor
    bucket_size: int
    num_buckets: int
    attend_across_buckets: bool
    causal: bool
    dedup_pairs: bool
    self_value: float
    mask_value: float

    @property
    def rounds(self) -> int:
        return self.sort_idx.shape[2]

    @property
    def n_chunks(self) -> int:
        return self.sort_idx.shape[3] // self.bucket_size

    def blocks(self, batch_heads: int) -> list[tuple[int, int]]:
        """Chunk ranges ``[a, e)`` of one round, about :data:`BLOCK_ELEMENTS` scores each."""
        c = self.bucket_size
        step = max(1, BLOCK_ELEMENTS // (batch_heads * c * 2 * c))
        return [(a, min(a + step, self.n_chunks)) for a in range(0, self.n_chunks, step)]

    def locations(self) -> torch.Tensor:
        """Where each token sits in each round, ``(b, h, rounds, n_pad)``, as an integer ``loc`` such that query
        i sees key j of a round's window exactly when ``|2 (loc(i) - loc(j)) - off| <= off`` (:attr:`offset`).

        Bidirectional: ``loc`` = chunk (plus ``bucket * 2 chunks`` when buckets may not mix), seen when the
        difference is 0 or 1 (``off`` = 1). Causal: ``loc`` = sorted slot plus ``bucket * (c + 1)``, seen when
        the difference lies in ``[0, c]`` (``off`` = c): within a bucket, sorted slots follow positions, and
        different buckets are more than ``c`` apart, since sorted slots already increase with the bucket.
        """
        c, dtype = self.bucket_size, self.location_dtype()
        if self.causal:
            return (self.rank + self.buckets * (c + 1)).to(dtype)
        loc = torch.div(self.rank, c, rounding_mode="floor")
        if not self.attend_across_buckets:
            loc = loc + self.buckets * (2 * self.n_chunks)  # different buckets differ by >= chunks + 1
        return loc.to(dtype)

    @property
    def offset(self) -> int:
        return self.bucket_size if self.causal else 1

    def location_dtype(self) -> torch.dtype:
        """int16 where ``2 loc`` fits (the pair-sized differences are then 2 bytes), else int32."""
        n_pad, c = self.sort_idx.shape[3], self.bucket_size
        if self.causal:
            largest = n_pad + (self.num_buckets + 1) * (c + 1)
        else:
            largest = self.n_chunks * (1 if self.attend_across_buckets else 2 * self.num_buckets + 2)
        return torch.int16 if 2 * largest + c < 2**15 else torch.int32

    def window_slots(self, a: int, e: int, device: torch.device) -> torch.Tensor:
        """Sorted slots of the keys chunks ``a .. e-1`` see: ``(e - a, 2c)``, own chunk then the previous one.

        Chunk 0's previous chunk wraps to the last one; :func:`block_scores` blocks it (no wrap-around).
        """
        c, n_pad = self.bucket_size, self.sort_idx.shape[3]
        own = torch.arange(a * c, e * c, device=device).view(e - a, c)
        return torch.cat([own, (own - c) % n_pad], dim=1)


@dataclass
class _Round:
    """One round's index tensors in its sorted order, ``(b, h, n_pad)`` (``(b, h, rounds - 1, n_pad)`` for the
    other rounds): flat row of each slot's token (into ``(b h n_pad, d)``), its position, whether it is padding,
    and its locations (:meth:`LshPlan.locations`) as a query (``2 loc - off``) and as a key (``2 loc``), in this
    round (causal only) and in the other rounds (``dedup_pairs`` only)."""

    flat: torch.Tensor
    token: torch.Tensor
    padding: torch.Tensor
    bucket: torch.Tensor | None  # buckets may not mix, bidirectional
    own_q: torch.Tensor | None
    own_k: torch.Tensor | None
    other_q: torch.Tensor | None
    other_k: torch.Tensor | None


def _round(plan: LshPlan, r: int, loc: torch.Tensor) -> _Round:
    batch, heads, rounds, n_pad = plan.sort_idx.shape
    token = plan.sort_idx[:, :, r].long()
    base = (torch.arange(batch * heads, device=token.device) * n_pad).view(batch, heads, 1)
    bucket = plan.buckets[:, :, r].gather(2, token)
    dtype, off = loc.dtype, plan.offset
    rd = _Round(flat=token + base, token=token, padding=bucket == plan.num_buckets, bucket=None, own_q=None,
                own_k=None, other_q=None, other_k=None)
    if plan.causal:
        own = loc[:, :, r].gather(2, token)
        rd.own_q, rd.own_k = (2 * own - off).to(dtype), (2 * own).to(dtype)
    elif not plan.attend_across_buckets:
        rd.bucket = bucket.to(dtype)
    if plan.dedup_pairs and rounds > 1:
        others = [s for s in range(rounds) if s != r]
        other = loc[:, :, others].gather(3, token[:, :, None].expand(-1, -1, rounds - 1, -1))
        rd.other_q, rd.other_k = (2 * other - off).to(dtype), (2 * other).to(dtype)
    return rd


@dataclass
class _Block:
    """A block's gathered rows and rebuilt scores: ``scores (b, h, m, c, 2c)`` with every bias added,
    ``counts`` (same shape, float) or None, query rows ``qi (b h m c)`` and key rows ``ki (b h m 2c)``."""

    scores: torch.Tensor
    counts: torch.Tensor | None
    qi: torch.Tensor
    ki: torch.Tensor
    qs: torch.Tensor  # (b, h, m, c, d): scaled queries
    kn: torch.Tensor  # (b, h, m, 2c, d): unit keys
    nu: torch.Tensor  # (b, h, m, 2c, 1): the keys' norms, clamped to KEY_EPS


def block_scores(plan: LshPlan, rd: _Round, a: int, e: int, q_flat: torch.Tensor, k_flat: torch.Tensor,
                 scale: float) -> _Block:
    """The scores of chunks ``a .. e-1`` of one round, bias and all, as the stored form computes them.

    Same values in the same order of operations: ``q_i * scale . k_j / |k_j|``, then the blocked-pair bias
    (``mask_value``: padded key, chunk 0's missing previous chunk, other bucket when buckets may not mix,
    causal), then the self bias (``self_value``); ``counts`` is how many rounds see each pair (``dedup_pairs``).
    """
    batch, heads, n_pad = rd.flat.shape
    d = q_flat.shape[-1]
    c, m = plan.bucket_size, e - a
    win = plan.window_slots(a, e, q_flat.device).view(-1)
    qi = rd.flat[:, :, a * c:e * c].reshape(-1)
    ki = rd.flat[:, :, win].reshape(-1)
    qs = q_flat.index_select(0, qi).view(batch, heads, m, c, d).mul_(scale)
    # Keys normalised as gathered (a row's norm is its own): no (n, d) copy of the unit keys is kept. The
    # arithmetic of F.normalize: k / max(|k|, eps).
    k_rows = k_flat.index_select(0, ki).view(batch, heads, m, 2 * c, d)
    nu = torch.linalg.vector_norm(k_rows, dim=-1, keepdim=True).clamp_min_(KEY_EPS)
    kn = k_rows.div_(nu)
    scores = torch.matmul(qs, kn.transpose(-1, -2))  # (b, h, m, c, 2c)

    key_blocked = rd.padding[:, :, win].view(batch, heads, m, 2 * c)
    if a == 0:
        key_blocked[:, :, 0, c:] = True  # the first chunk has no previous chunk
    if rd.own_q is not None or rd.bucket is not None:
        # Pairwise blocking (causal, or buckets that may not mix) as integer arithmetic on small dtypes:
        # comparisons writing bool are several times slower on CPU.
        if rd.own_q is not None:
            miss = _outside(_pair_diff(rd.own_q, rd.own_k, a, e, c, win), plan.offset)
        else:
            miss = _pair_diff(rd.bucket, rd.bucket, a, e, c, win).abs_().clamp_(max=1)  # other bucket
        miss = torch.maximum(miss, key_blocked.to(miss.dtype)[..., None, :])  # one bias per blocked pair
        scores.add_(miss.to(scores.dtype), alpha=plan.mask_value)
    elif bool(key_blocked.any()):  # skip the pass when nothing is blocked (no padding, not chunk 0)
        scores.add_(key_blocked.to(scores.dtype)[..., None, :], alpha=plan.mask_value)
    scores[..., :c].diagonal(dim1=-2, dim2=-1).add_(plan.self_value)  # slot i of the chunk is window key i

    counts = None
    if rd.other_q is not None:
        counts = _pair_counts(plan, rd, a, e, win).to(scores.dtype)
    return _Block(scores=scores, counts=counts, qi=qi, ki=ki, qs=qs, kn=kn, nu=nu)


def _pair_diff(query: torch.Tensor, key: torch.Tensor, a: int, e: int, c: int, win: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``query[i] - key[j]`` for the block's pairs: ``(..., n_pad)`` -> ``(..., m, c, 2c)``."""
    m = e - a
    lead = query.shape[:-1]
    qv = query[..., a * c:e * c].view(*lead, m, c, 1)
    kv = key[..., win].view(*lead, m, 1, 2 * c)
    return torch.sub(qv, kv, out=out) if out is not None else qv - kv


def _outside(t: torch.Tensor, off: int) -> torch.Tensor:
    """In place: 1 where ``|t| > off``, else 0 (``t`` integer)."""
    return t.abs_().sub_(off).clamp_(0, 1)


def _pair_counts(plan: LshPlan, rd: _Round, a: int, e: int, win: torch.Tensor) -> torch.Tensor:
    """In how many rounds each (query, key) pair of the block shares a window: ``rounds`` minus the other
    rounds that do not see it (integer, ``(b, h, m, c, 2c)``)."""
    others, c = rd.other_q.shape[2], plan.bucket_size
    misses = _outside(_pair_diff(rd.other_q[:, :, 0], rd.other_k[:, :, 0], a, e, c, win), plan.offset)
    diff = torch.empty_like(misses) if others > 1 else None
    for o in range(1, others):
        misses.add_(_outside(_pair_diff(rd.other_q[:, :, o], rd.other_k[:, :, o], a, e, c, win, out=diff),
                             plan.offset))
    return misses.neg_().add_(others + 1)


def chunk_keep_mask(seed: int, r: int, a: int, e: int, n_chunks: int, shape: tuple[int, ...],
                    p: float, device: torch.device) -> torch.Tensor:
    """Dropout keep mask of chunks ``a .. e-1`` of round ``r``: ``(b, h, e - a, c, 2c)``, chunk ``j`` drawn as
    part ``r * n_chunks + j`` of shape ``shape = (b, h, c, 2c)`` (see :func:`attentions._dropout.keep_mask`)."""
    return torch.stack([keep_mask(seed, r * n_chunks + j, shape, p, device) for j in range(a, e)], dim=2)


def _normalised(scores: torch.Tensor, top: torch.Tensor, total: torch.Tensor,
                counts: torch.Tensor | None) -> torch.Tensor:
    """``exp(s - top) / counts / total`` in place (the stored form's order of operations)."""
    probs = scores.sub_(top[..., None]).exp_()
    if counts is not None:
        probs.div_(counts)
    return probs.div_(total[..., None])


def _forward(q, k, v, plan: LshPlan, p: float, seed: int):
    batch, heads, n_pad, d = q.shape
    c, rounds, n_chunks = plan.bucket_size, plan.rounds, plan.n_chunks
    scale = d**-0.5
    q_flat, k_flat, v_flat = q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)
    loc = plan.locations()
    top = q.new_empty(batch, heads, rounds, n_pad)
    total = q.new_empty(batch, heads, rounds, n_pad)
    acc = den = run_max = None
    for r in range(rounds):
        rd = _round(plan, r, loc)
        o_r = torch.empty_like(q_flat)  # this round's output, token order
        for a, e in plan.blocks(batch * heads):
            blk = block_scores(plan, rd, a, e, q_flat, k_flat, scale)
            t = blk.scores.amax(dim=-1)
            probs = blk.scores.sub_(t[..., None]).exp_()
            if blk.counts is not None:
                probs.div_(blk.counts)
            s = probs.sum(dim=-1)
            probs.div_(s[..., None])
            top[:, :, r, a * c:e * c] = t.view(batch, heads, -1)
            total[:, :, r, a * c:e * c] = s.view(batch, heads, -1)
            if p > 0.0:
                keep = chunk_keep_mask(seed, r, a, e, n_chunks, (batch, heads, c, 2 * c), p, q.device)
                probs = probs.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
            vw = v_flat.index_select(0, blk.ki).view(batch, heads, e - a, 2 * c, d)
            o_r.index_copy_(0, blk.qi, torch.matmul(probs, vw).view(-1, d))
        o_r = o_r.view(batch, heads, n_pad, d)
        if rounds == 1:
            return o_r, top, total
        lse = (top[:, :, r] + total[:, :, r].log()).gather(2, plan.rank[:, :, r].long())  # token order
        if acc is None:
            acc, run_max, den = o_r, lse, torch.ones_like(lse)
            continue
        new_max = torch.maximum(run_max, lse)
        alpha, beta = (run_max - new_max).exp_(), (lse - new_max).exp_()
        acc.mul_(alpha[..., None]).add_(o_r.mul_(beta[..., None]))
        den.mul_(alpha).add_(beta)
        run_max = new_max
    return acc.div_(den[..., None]), top, total


def _round_weights(plan: LshPlan, top: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``softmax_r(lse_r)`` per token, ``(b, h, rounds, n_pad)`` in token order."""
    lse = (top + total.log()).gather(3, plan.rank.long())
    return torch.softmax(lse, dim=2)


def _backward(ctx, grad_out):
    q, k, v, out, top, total = ctx.saved_tensors
    plan, p, seed = ctx.plan, ctx.p, ctx.seed
    batch, heads, n_pad, d = q.shape
    c, rounds, n_chunks = plan.bucket_size, plan.rounds, plan.n_chunks
    scale = d**-0.5
    delta = torch.einsum("bhnd,bhnd->bhn", grad_out, out)  # D = dout . out per token
    weights = _round_weights(plan, top, total)
    q_flat, k_flat, v_flat = q.view(-1, d), k.view(-1, d), v.view(-1, d)
    # Shared QK (one input tensor): one accumulator for both gradients.
    dq, dv = torch.zeros_like(q_flat), torch.zeros_like(v_flat)
    dk = dq if ctx.shared else torch.zeros_like(k_flat)
    loc = plan.locations()
    for r in range(rounds):
        rd = _round(plan, r, loc)
        w_r = weights[:, :, r].gather(2, rd.token)  # sorted order
        wd_r = (weights[:, :, r] * delta).gather(2, rd.token)
        for a, e in plan.blocks(batch * heads):
            m = e - a
            blk = block_scores(plan, rd, a, e, q_flat, k_flat, scale)
            rows = slice(a * c, e * c)
            probs = _normalised(blk.scores, top[:, :, r, rows].view(batch, heads, m, c),
                                total[:, :, r, rows].view(batch, heads, m, c), blk.counts)
            # dL/do_r = w_r dout, gathered by position (grad_out may be an expanded view: never copied whole)
            g = _rows(grad_out, rd.token[:, :, rows]).view(batch, heads, m, c, d)
            g = g.mul_(w_r[:, :, rows].reshape(batch, heads, m, c, 1))
            vw = v_flat.index_select(0, blk.ki).view(batch, heads, m, 2 * c, d)
            dp = torch.matmul(g, vw.transpose(-1, -2))  # (b, h, m, c, 2c)
            if p > 0.0:
                keep = chunk_keep_mask(seed, r, a, e, n_chunks, (batch, heads, c, 2 * c), p, q.device)
                dropped = probs.masked_fill(~keep, 0.0).mul_(1.0 / (1.0 - p))
                dp.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
            else:
                dropped = probs
            dv.index_add_(0, blk.ki, torch.matmul(dropped.transpose(-1, -2), g).view(-1, d))
            del dropped
            # d s = w_r P_r (dP - D), with g already carrying w_r.
            ds = probs.mul_(dp.sub_(wd_r[:, :, rows].reshape(batch, heads, m, c, 1)))
            dq.index_add_(0, blk.qi, torch.matmul(ds, blk.kn).mul_(scale).view(-1, d))
            dkn = torch.matmul(ds.transpose(-1, -2), blk.qs)  # (b, h, m, 2c, d)
            dk.index_add_(0, blk.ki, _normalize_backward(blk.kn, blk.nu, dkn).view(-1, d))
    shape = (batch, heads, n_pad, d)
    return dq.view(shape), None if ctx.shared else dk.view(shape), dv.view(shape)


def _rows(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``x[b, h, token[b, h, i]]``: ``(b, h, n, d)`` at ``(b, h, L)`` -> ``(b, h, L, d)``, for any strides."""
    batch, heads, _ = token.shape
    b = torch.arange(batch, device=x.device).view(batch, 1, 1)
    h = torch.arange(heads, device=x.device).view(1, heads, 1)
    return x[b, h, token]


def _normalize_backward(kn: torch.Tensor, nu: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of ``kn = k / nu``, ``nu = max(|k|, eps)``, for ``grad`` (consumed, in place), row by row:
    ``(grad - kn (kn . grad)) / nu``; where the norm is clamped (``nu == eps``) only ``grad / eps``."""
    dot = torch.einsum("...kd,...kd->...k", kn, grad).unsqueeze(-1)
    dot = dot.masked_fill_(nu <= KEY_EPS, 0.0)
    return grad.addcmul_(kn, dot, value=-1.0).div_(nu)


class LshAttention(torch.autograd.Function):
    """``out = LshAttention.apply(q, k, v, plan, dropout, seed)``: ``(b, h, n_pad, d)``, see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, plan: LshPlan, p: float, seed: int):
        ctx.shared = k is q  # shared QK: one gradient for both, summed here rather than by autograd
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, top, total = _forward(q, k, v, plan, p, seed)
        ctx.save_for_backward(q, k, v, out, top, total)
        ctx.plan, ctx.p, ctx.seed = plan, p, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        # Shared QK: q and k are one tensor, whose gradient dq + dk is returned once (None counts as zero).
        dq, dk, dv = _backward(ctx, grad_out)
        return dq, dk, dv, None, None, None
