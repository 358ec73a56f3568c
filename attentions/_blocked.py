"""Blocked computation shared by the sparse-pattern mechanisms (sliding_window, longformer, bigbird).

The query rows are cut into blocks of ``block`` tokens. Each query block sees a small, fixed-size set
of ``K`` key slots (neighbouring blocks, random blocks, global tokens), so scores are
``(batch, heads, blocks, block, K)``: ``O(n K)``, never ``n x n``. A mechanism states its pattern as a
list of :class:`Part` (which rows, which key slots, which (query, key) position pairs are allowed); the
two executors run it: :func:`attend_recompute` (chunks of query blocks, O(n d) kept for backward) and
:func:`attend_stored` (autograd over all blocks at once, the probabilities kept).

Key slots that fall outside the sequence (before position 0, after the last position, or an unused
random slot) carry position ``-1`` or ``>= n`` and are masked, as are padded keys.

Grouped-query attention (Ainslie et al. 2023): ``k``, ``v`` may have ``kv_heads`` heads dividing the ``heads`` of
``q``, key-value head ``j`` serving the ``g`` consecutive query heads ``j g .. j g + g - 1``. A plan's pattern
depends on positions only (bigbird's random blocks are drawn per query block, the same for every head), so the
``g`` query heads of a group read the same key slots: both executors fold them into the rows of one query block
(:func:`_fold_rows`: ``(batch, kv_heads, blocks, g c, d)``) against the group's gathered key slots ``(batch,
kv_heads, blocks, K, d)``. k and v are gathered once per key-value head, never repeated, and their gradients sum
over the group inside the same products. Dropout masks are drawn in the ungrouped layout ``(batch, heads, blocks, c,
K)`` and folded alike, so a grouped call drops exactly what an ungrouped call on repeated k, v drops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._dropout import draw_seed, keep_mask

# Position of a key slot that holds no key (an unused random block, say).
NO_KEY = -1


def num_blocks(n: int, block: int) -> int:
    """Blocks of ``block`` tokens needed to cover ``n`` tokens."""
    return -(-n // block)


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
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over the last two dims with a boolean ``allowed`` mask.

    ``q``: ``(..., Q, d)``, ``k``/``v``: ``(..., K, d)``, ``allowed`` broadcasts to ``(..., Q, K)``.
    Disallowed keys get exactly zero weight; a row with no allowed key outputs zeros and passes
    zero gradient back. ``dropout`` drops attention probabilities in training mode: with the
    given ``keep`` mask (bool, the probabilities' shape) when there is one, else a fresh draw.

    A hand-written backward keeps only the probabilities and computes the score gradient in
    place (as FlashAttention does, with ``rowsum(dP * P) = rowsum(dO * O)``), skipping the
    masking and softmax-backward passes and temporaries that autograd would make over ``(Q, K)``
    tensors. Not twice differentiable.
    """
    p = dropout if training else 0.0
    return _MaskedAttention.apply(q, k, v, allowed, p, keep)


class _MaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, allowed, dropout, keep=None):
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if allowed is not None:
            # The lowest finite value, not -inf: a row with no allowed key stays finite (uniform),
            # and is zeroed below; elsewhere exp(min - rowmax) is exactly 0.
            scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        if dropout == 0.0:
            keep = None
        elif keep is None:
            keep = torch.rand_like(probs) >= dropout
        if keep is not None:
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
        return _unbroadcast(grad_q, q), _unbroadcast(grad_k, k), _unbroadcast(grad_v, v), None, None, None


def _unbroadcast(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum ``grad`` over the dimensions that matmul broadcast ``like`` along."""
    if grad.shape == like.shape:
        return grad
    extra = grad.dim() - like.dim()
    if extra:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, like.shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _fold_rows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Query-side blocks ``(batch, heads, G, c, m)`` -> ``(batch, kv_heads, G, g c, m)``, ``g = heads / kv_heads``: the
    rows of the ``g`` query heads of a key-value head stacked in each query block (a copy of the chunk when ``g > 1``;
    ``x`` itself when ``g == 1``)."""
    batch, heads, blocks, c, m = x.shape
    g = heads // kv_heads
    if g == 1:
        return x
    return x.view(batch, kv_heads, g, blocks, c, m).transpose(2, 3).reshape(batch, kv_heads, blocks, g * c, m)


def _unfold_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`_fold_rows`: ``(batch, kv_heads, G, g c, m)`` -> ``(batch, heads, G, c, m)``."""
    batch, kv_heads, blocks, rows, m = x.shape
    g = heads // kv_heads
    if g == 1:
        return x
    return x.view(batch, kv_heads, blocks, g, rows // g, m).transpose(2, 3).reshape(batch, heads, blocks, rows // g, m)


def _fold_allowed(allowed: torch.Tensor, groups: int) -> torch.Tensor:
    """An allowed mask ``(batch | 1, 1, G, c, K)`` (the same for every head) repeated for the ``groups`` stacked rows
    of :func:`_fold_rows`: ``(batch | 1, 1, G, groups c, K)``."""
    if groups == 1:
        return allowed
    return allowed.unsqueeze(3).expand(*allowed.shape[:3], groups, *allowed.shape[3:]).flatten(3, 4)


# ----------------------------------------------------------------------------- plans and their two executors
#
# A mechanism states its pattern once, as a list of :class:`Part` (query rows, the key slots of each
# query block, a mask on (query, key) positions). Two executors run a plan and give the same result:
# :func:`attend_recompute` (the default: one autograd function over chunks of query blocks, saving only
# q, k, v and the output; scores, probabilities, gathered keys and dropout masks are rebuilt chunk by chunk
# in backward) and :func:`attend_stored` (autograd over the whole gathered blocks, :func:`masked_attention`
# keeping the probabilities: more memory, the same numbers). Both cut the query blocks into the same
# chunks, so the dropout mask of chunk ``j`` is ``keep_mask(seed, j, ...)`` in both and in the recomputing
# backward.

# Score elements (batch x heads x rows x keys) per chunk. About 2 MiB of fp32 scores: the chunk's
# temporaries (scores, dropout, score gradient, gathered keys and their gradients) stay near 10 MiB,
# while each matmul still has whole query blocks to work on.
CHUNK_SCORES = 1 << 19


@dataclass(frozen=True)
class Part:
    """Query rows that share one layout of key slots, cut into query blocks of ``block`` rows.

    ``rows``: ``(start, stop)`` for the contiguous rows ``start .. stop - 1``, or a 1-D long tensor of
    distinct rows. Key slots of a query block, in this order:

    - ``band=(left, right)``: key blocks ``i - left .. i + right`` of ``block`` tokens, where ``i`` is
      the query block's own position in the sequence (``start // block`` plus its index; needs a
      contiguous part whose ``start`` is a multiple of ``block``);
    - ``gathered``: ``(blocks, P)`` absolute key positions per query block (``NO_KEY`` or ``>= n``: none);
    - ``prefix=L``: the keys ``0 .. L - 1``, the same for every query block; it is the only segment, and
      ``block`` may be None (the executor then picks the rows per block from :data:`CHUNK_SCORES`).

    ``pattern(query_pos, key_pos)`` gets ``(G, c, 1)`` query and ``(G, 1, K)`` key positions of ``G``
    query blocks and returns a bool mask broadcastable to ``(G, c, K)``: which pairs may attend (None:
    all). Keys outside ``0 .. n - 1`` or padded are masked on top of it by the executors.

    A row of an earlier part that a later (index) part owns must be empty in the earlier one (its
    pattern allows no key there): the later part's output overwrites it.
    """

    rows: tuple[int, int] | torch.Tensor
    block: int | None
    band: tuple[int, int] | None = None
    gathered: torch.Tensor | None = None
    prefix: int | None = None
    pattern: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        return self.rows[1] - self.rows[0] if isinstance(self.rows, tuple) else self.rows.numel()


def causal_pattern(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """A :class:`Part` pattern: key ``j`` allowed for query ``i`` iff ``j <= i``."""
    return key_pos <= query_pos


@dataclass(frozen=True)
class _Layout:
    """Block length, query blocks, blocks per chunk, keys per query block of one part at one input size."""

    block: int
    blocks: int
    per_chunk: int
    keys: int

    def chunks(self) -> list[tuple[int, int]]:
        return [(b0, min(b0 + self.per_chunk, self.blocks)) for b0 in range(0, self.blocks, self.per_chunk)]


def _layout(part: Part, batch: int, heads: int) -> _Layout:
    if part.prefix is not None:
        rows = max(1, min(part.num_rows, CHUNK_SCORES // max(1, batch * heads * part.prefix)))
        block = part.block or rows
        return _Layout(block, num_blocks(part.num_rows, block), 1, part.prefix)
    keys = 0
    if part.band is not None:
        keys += (part.band[0] + part.band[1] + 1) * part.block
    if part.gathered is not None:
        keys += part.gathered.shape[1]
    per_chunk = max(1, CHUNK_SCORES // max(1, batch * heads * part.block * keys))
    return _Layout(part.block, num_blocks(part.num_rows, part.block), per_chunk, keys)


def _row_index(part: Part, r0: int, r1: int, device: torch.device) -> torch.Tensor:
    """Query positions of the part's rows ``r0 .. r1 - 1`` (its own numbering), ``-1`` beyond its end."""
    if isinstance(part.rows, tuple):
        pos = torch.arange(part.rows[0] + r0, part.rows[0] + r1, device=device)
        return pos.masked_fill(pos >= part.rows[1], -1)
    idx = part.rows[r0:r1]
    return F.pad(idx, (0, r1 - r0 - idx.numel()), value=-1)


def _read_rows(x: torch.Tensor, part: Part, lay: _Layout, b0: int, b1: int) -> torch.Tensor:
    """Rows of query blocks ``b0 .. b1 - 1`` of ``x`` ``(batch, heads, n, d)``: ``(batch, heads, G, c, d)``,
    zeros beyond the part's last row."""
    c = lay.block
    r0, r1 = b0 * c, min(b1 * c, part.num_rows)
    if isinstance(part.rows, tuple):
        rows = x[:, :, part.rows[0] + r0: part.rows[0] + r1]
    else:
        rows = x.index_select(2, part.rows[r0:r1])
    rows = F.pad(rows, (0, 0, 0, (b1 - b0) * c - (r1 - r0)))
    return rows.unflatten(2, (b1 - b0, c))


def _put_rows(out: torch.Tensor, rows: torch.Tensor, part: Part, lay: _Layout, b0: int, b1: int,
              add: bool = False) -> None:
    """Write (or add) ``rows`` ``(batch, heads, G, c, d)`` into the part's rows of ``out``, in place."""
    c = lay.block
    r0, r1 = b0 * c, min(b1 * c, part.num_rows)
    rows = rows.flatten(2, 3)[:, :, : r1 - r0]
    if isinstance(part.rows, tuple):
        target = out[:, :, part.rows[0] + r0: part.rows[0] + r1]
        target.add_(rows) if add else target.copy_(rows)
    elif add:
        out.index_add_(2, part.rows[r0:r1], rows)
    else:
        out.index_copy_(2, part.rows[r0:r1], rows)


def _first_key_block(part: Part, block: int) -> int:
    start = part.rows[0] if isinstance(part.rows, tuple) else None
    if start is None or start % block:
        raise ValueError(f"a band part needs contiguous rows starting at a multiple of {block}, got {part.rows}")
    return start // block


def _key_positions(part: Part, lay: _Layout, b0: int, b1: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the key slots of query blocks ``b0 .. b1 - 1``: ``(G, K)`` (``(1, L)`` for a prefix)."""
    if part.prefix is not None:
        return torch.arange(part.prefix, device=device)[None]
    segments = []
    if part.band is not None:
        left, right = part.band
        first = _first_key_block(part, lay.block) + b0
        starts = (torch.arange(first, first + b1 - b0, device=device)[:, None]
                  + torch.arange(-left, right + 1, device=device)[None, :]) * lay.block
        segments.append((starts[:, :, None] + torch.arange(lay.block, device=device)).flatten(1))
    if part.gathered is not None:
        segments.append(part.gathered[b0:b1])
    return segments[0] if len(segments) == 1 else torch.cat(segments, dim=1)


def _band_keys(x: torch.Tensor, part: Part, lay: _Layout, b0: int, b1: int) -> torch.Tensor:
    """Band key slots of query blocks ``b0 .. b1 - 1``: ``(batch, heads, G, (left + right + 1) c, d)``, zeros
    outside the sequence; an overlapping view of one window of ``x``, copied only at the sequence's ends."""
    left, right = part.band
    c, n = lay.block, x.shape[2]
    first = _first_key_block(part, c) + b0
    lo, hi = (first - left) * c, (first + b1 - b0 + right) * c
    window = x[:, :, max(lo, 0): min(hi, n)]
    if lo < 0 or hi > n:
        window = F.pad(window, (0, 0, max(0, -lo), max(0, hi - n)))
    return window.unfold(2, (left + right + 1) * c, c).transpose(-1, -2)


def _gather_keys(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, heads, n, d)`` at ``positions`` ``(G, P)``, clamped into the sequence:
    ``(batch, heads, G, P, d)``."""
    batch, heads, n, d = x.shape
    index = positions.clamp(0, n - 1).flatten()
    if x.is_contiguous():  # index_select along dim 1 of a 3-D view is several times faster than along dim 2
        picked = x.view(batch * heads, n, d).index_select(1, index)
    else:
        picked = x.index_select(2, index)
    return picked.view(batch, heads, *positions.shape, d)


def _chunk_keys(x: torch.Tensor, part: Part, lay: _Layout, b0: int, b1: int) -> torch.Tensor:
    """Key (or value) slots of query blocks ``b0 .. b1 - 1``: ``(batch, heads, G, K, d)`` (``G = 1`` for a prefix)."""
    if part.prefix is not None:
        return x[:, :, None, : part.prefix]
    segments = []
    if part.band is not None:
        segments.append(_band_keys(x, part, lay, b0, b1))
    if part.gathered is not None:
        segments.append(_gather_keys(x, part.gathered[b0:b1]))
    return segments[0] if len(segments) == 1 else torch.cat(segments, dim=3)


def _scatter_keys(grad_x: torch.Tensor, grad: torch.Tensor, part: Part, lay: _Layout, b0: int, b1: int) -> None:
    """Add the gradient of key slots ``grad`` ``(batch, heads, G, K, d)`` into ``grad_x`` ``(batch, heads, n, d)``
    (contiguous) at the slots' positions. Slots outside the sequence carry exactly zero gradient (zero
    probability) and are skipped or added to a clamped position."""
    batch, heads, n, d = grad_x.shape
    if part.prefix is not None:
        grad_x[:, :, : part.prefix].add_(grad[:, :, 0])
        return
    offset = 0
    if part.band is not None:
        left, right = part.band
        c, count = lay.block, b1 - b0
        width = left + right + 1
        band = grad[:, :, :, : width * c].unflatten(3, (width, c))
        first = _first_key_block(part, c) + b0
        for o in range(width):
            # Slot block o of query block first + g holds key block first + g - left + o.
            kb = first - left + o
            g0, g1 = max(0, -kb), min(count, num_blocks(n, c) - kb)
            if g1 <= g0:
                continue
            r0, r1 = (kb + g0) * c, min((kb + g1) * c, n)
            grad_x[:, :, r0:r1].add_(band[:, :, g0:g1, o].flatten(2, 3)[:, :, : r1 - r0])
        offset = width * c
    if part.gathered is not None:
        positions = part.gathered[b0:b1]
        index = positions.clamp(0, n - 1).flatten()
        source = grad[:, :, :, offset:].reshape(batch * heads, -1, d)
        grad_x.view(batch * heads, n, d).index_add_(1, index, source)


def _chunk_allowed(part: Part, lay: _Layout, b0: int, b1: int, key_pos: torch.Tensor, n: int,
                   key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Allowed (query, key slot) pairs of query blocks ``b0 .. b1 - 1``: bool ``(batch | 1, 1, G, c, K)``."""
    c = lay.block
    query_pos = _row_index(part, b0 * c, b1 * c, key_pos.device).view(b1 - b0, c)
    allowed = key_exists(key_pos, n, key_padding_mask)[:, :, None, :] & (query_pos >= 0)[None, :, :, None]
    if part.pattern is not None:
        # int32: the (G, c, K) position arithmetic is several times slower in int64 on a CPU.
        allowed = allowed & part.pattern(query_pos.int()[:, :, None], key_pos.int()[:, None, :])
    return allowed[:, None]


def _dropout_keep(seed: int, first_part: int, lay: _Layout, shape: tuple[int, ...], p: float,
                  device: torch.device) -> torch.Tensor:
    """The keep masks of every chunk of a part, side by side along the blocks: what the recomputing path
    draws chunk by chunk (chunk ``j`` of the part is dropout part ``first_part + j``)."""
    masks = [keep_mask(seed, first_part + j, (*shape[:2], b1 - b0, *shape[3:]), p, device)
             for j, (b0, b1) in enumerate(lay.chunks())]
    return torch.cat(masks, dim=2)


def attend_stored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[Part],
                  key_padding_mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Run ``parts`` on ``(batch, heads, n, d)`` queries and ``(batch, kv_heads, n, d)`` keys and values (``kv_heads``
    dividing ``heads``: grouped, module docstring) with autograd over the whole gathered blocks
    (``recompute=False``): the probabilities ``(batch, heads, blocks, c, K)`` and the gathered keys are kept for
    backward. ``dropout``: the probability of dropping (0 outside training). Same result as
    :func:`attend_recompute`, dropout masks included (same seed: same masks)."""
    batch, heads, n, d = q.shape
    kv_heads = k.shape[1]
    seed = draw_seed() if dropout > 0.0 else 0
    out = q.new_zeros(batch, heads, n, d)
    first_part = 0
    for part in parts:
        lay = _layout(part, batch, heads)
        key_pos = _key_positions(part, lay, 0, lay.blocks, q.device)
        allowed = _chunk_allowed(part, lay, 0, lay.blocks, key_pos, n, key_padding_mask)
        qb = _fold_rows(_read_rows(q, part, lay, 0, lay.blocks), kv_heads)
        kb, vb = _chunk_keys(k, part, lay, 0, lay.blocks), _chunk_keys(v, part, lay, 0, lay.blocks)
        keep = None
        if dropout > 0.0:
            keep = _fold_rows(_dropout_keep(seed, first_part, lay, (batch, heads, lay.blocks, lay.block, lay.keys),
                                            dropout, q.device), kv_heads)
        first_part += len(lay.chunks())
        rows = masked_attention(qb, kb, vb, _fold_allowed(allowed, heads // kv_heads), dropout,
                                training=dropout > 0.0, keep=keep)
        rows = _unfold_rows(rows, heads).flatten(2, 3)[:, :, : part.num_rows]
        if isinstance(part.rows, tuple):
            out = torch.slice_scatter(out, rows, dim=2, start=part.rows[0], end=part.rows[1])
        else:
            out = out.index_copy(2, part.rows, rows)
    return out


def attend_recompute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: list[Part],
                     key_padding_mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Run ``parts`` on ``(batch, heads, n, d)`` queries and ``(batch, kv_heads, n, d)`` keys and values (``kv_heads``
    dividing ``heads``: grouped, module docstring) chunk by chunk, keeping only O(n d) for backward.

    Per chunk of query blocks: gather the key slots, mask, softmax, dropout drawn from ``(seed, chunk)``
    (:mod:`attentions._dropout`), times the values. Backward recomputes each chunk's probabilities (the
    same fused softmax of the same scores) and its gradients as FlashAttention does (Dao et al. 2022,
    ``rowsum(dP * P) = rowsum(dO * O)``). Peak memory is O(n d) plus one chunk's :data:`CHUNK_SCORES`
    scores; time is one more ``q k^T`` product and softmax than the stored path. A row with no allowed
    key outputs zeros and passes zero gradient back. Not twice differentiable.
    """
    seed = draw_seed() if dropout > 0.0 else 0
    return _RecomputedAttention.apply(q, k, v, key_padding_mask, parts, dropout, seed)


def _chunk_probs(q_rows: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax of the scaled scores of one chunk over its allowed key slots: ``(batch, kv_heads, G, g c, K)``.

    ``q_rows`` ``(batch, kv_heads, G, g c, d)`` already scaled by ``1 / sqrt(d)``, the ``g`` query heads of each
    key-value head folded into the rows (:func:`_fold_rows`; ``g = 1`` without groups); ``keys`` ``(batch, kv_heads,
    G | 1, K, d)`` contiguous; ``allowed`` bool ``(batch | 1, 1, G, c, K)``, the same for every head. A row with no
    allowed key is all zeros. The mask enters as a ``0 / -inf`` bias copied into the score buffer (broadcast over the
    ``g`` stacked rows, not repeated), onto which the product accumulates (``baddbmm``), and the softmax is the fused
    kernel: the same probabilities in forward and in the recomputing backward. (On a CPU, ``masked_fill`` of the
    scores and ``exp_`` over their lowest-finite entries cost several times more than the copy and the fused softmax.)
    """
    batch, kv_heads, blocks, rows, d = q_rows.shape
    c, num_keys = allowed.shape[-2:]
    keys = keys.expand(batch, kv_heads, blocks, num_keys, d)
    if bool(allowed.all()):  # most chunks of bigbird, longformer's global rows: no bias to copy
        return torch.softmax(torch.matmul(q_rows, keys.transpose(-1, -2)), dim=-1)
    zero = torch.zeros((), dtype=q_rows.dtype, device=q_rows.device)
    bias = torch.where(allowed, zero, zero - math.inf)[:, :, :, None]  # (batch | 1, 1, G, 1, c, K)
    scores = torch.empty(batch, kv_heads, blocks, rows // c, c, num_keys, dtype=q_rows.dtype, device=q_rows.device)
    scores.copy_(bias.expand_as(scores))
    flat = scores.view(-1, rows, num_keys)
    flat.baddbmm_(q_rows.reshape(-1, rows, d), keys.reshape(-1, num_keys, d).transpose(-1, -2))
    probs = torch.softmax(scores, dim=-1)
    del scores
    empty = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        probs.masked_fill_(empty[:, :, :, None], 0.0)  # softmax of an all -inf row is NaN
    return probs.view(batch, kv_heads, blocks, rows, num_keys)


class _RecomputedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, parts, dropout, seed):
        batch, heads, n, d = q.shape
        kv_heads = k.shape[1]
        scale = 1.0 / math.sqrt(d)
        out = q.new_zeros(batch, heads, n, d)
        chunk_id = 0
        for part in parts:
            lay = _layout(part, batch, heads)
            for b0, b1 in lay.chunks():
                key_pos = _key_positions(part, lay, b0, b1, q.device)
                allowed = _chunk_allowed(part, lay, b0, b1, key_pos, n, key_padding_mask)
                probs = _chunk_probs(_fold_rows(_read_rows(q, part, lay, b0, b1) * scale, kv_heads),
                                     _chunk_keys(k, part, lay, b0, b1).contiguous(), allowed)
                probs = _drop(probs, (dropout, seed, chunk_id), heads, allowed.shape[-2])
                values = _chunk_keys(v, part, lay, b0, b1).contiguous()
                rows = torch.matmul(probs, values.expand(*probs.shape[:3], *values.shape[3:]))
                _put_rows(out, _unfold_rows(rows, heads), part, lay, b0, b1)
                chunk_id += 1
        ctx.save_for_backward(q, k, v, out, key_padding_mask)
        ctx.parts, ctx.dropout, ctx.seed = parts, dropout, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, key_padding_mask = ctx.saved_tensors
        parts, dropout, seed = ctx.parts, ctx.dropout, ctx.seed
        batch, heads, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        grad_q = torch.zeros(batch, heads, n, d, dtype=q.dtype, device=q.device)
        # kv_heads heads (each the sum over its group), contiguous (_scatter_keys adds into a flat view).
        grad_k, grad_v = (torch.zeros(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
        chunk_id = 0
        for part in parts:
            lay = _layout(part, batch, heads)
            for b0, b1 in lay.chunks():
                _chunk_backward(q, k, v, out, grad_out, key_padding_mask, part, lay, b0, b1, scale,
                                (dropout, seed, chunk_id), (grad_q, grad_k, grad_v))
                chunk_id += 1
        return grad_q, grad_k, grad_v, None, None, None, None


def _chunk_keep(probs: torch.Tensor, drop: tuple[float, int, int], heads: int, c: int) -> torch.Tensor:
    """The keep mask of chunk ``drop = (p, seed, chunk_id)`` for folded probabilities ``(batch, kv_heads, G, g c, K)``:
    drawn in the ungrouped layout ``(batch, heads, G, c, K)`` (what an ungrouped call draws), then folded."""
    dropout, seed, chunk_id = drop
    batch, kv_heads, blocks, _, num_keys = probs.shape
    keep = keep_mask(seed, chunk_id, (batch, heads, blocks, c, num_keys), dropout, probs.device)
    return _fold_rows(keep, kv_heads)


def _drop(probs: torch.Tensor, drop: tuple[float, int, int], heads: int, c: int) -> torch.Tensor:
    """Folded ``probs`` with chunk ``drop = (p, seed, chunk_id)``'s dropout (:func:`_chunk_keep`), kept entries scaled
    by ``1 / (1 - p)`` as :func:`attentions._dropout.apply_dropout`; ``probs`` itself when ``p == 0``."""
    if drop[0] == 0.0:
        return probs
    return probs.masked_fill(~_chunk_keep(probs, drop, heads, c), 0.0) * (1.0 / (1.0 - drop[0]))


def _chunk_backward(q, k, v, out, grad_out, key_padding_mask, part, lay, b0, b1, scale, drop, grads) -> None:
    """Gradients of one chunk, added into ``grads = (grad_q, grad_k, grad_v)``; ``drop = (p, seed, chunk_id)``.
    The query side (q, out, their gradients) is folded per key-value head as in the forward (:func:`_fold_rows`)."""
    dropout = drop[0]
    grad_q, grad_k, grad_v = grads
    heads, n = q.shape[1:3]
    kv_heads = k.shape[1]
    key_pos = _key_positions(part, lay, b0, b1, q.device)
    allowed = _chunk_allowed(part, lay, b0, b1, key_pos, n, key_padding_mask)
    q_rows = _fold_rows(_read_rows(q, part, lay, b0, b1) * scale, kv_heads)
    keys = _chunk_keys(k, part, lay, b0, b1).contiguous()
    values = _chunk_keys(v, part, lay, b0, b1).contiguous()
    probs = _chunk_probs(q_rows, keys, allowed)
    keys, values = (x.expand(*probs.shape[:3], *x.shape[3:]) for x in (keys, values))
    # contiguous: a loss like out.sum() hands back an expanded gradient with zero strides, which sends
    # matmul down a path hundreds of times slower than BLAS.
    grad_rows = _fold_rows(_read_rows(grad_out, part, lay, b0, b1).contiguous(), kv_heads)
    delta = (grad_rows * _fold_rows(_read_rows(out, part, lay, b0, b1), kv_heads)).sum(dim=-1, keepdim=True)
    keep = None
    if dropout > 0.0:
        keep = _chunk_keep(probs, drop, heads, allowed.shape[-2])
        dropped = probs.masked_fill(~keep, 0.0).mul_(1.0 / (1.0 - dropout))
    else:
        dropped = probs
    _scatter_keys(grad_v, torch.matmul(dropped.transpose(-1, -2), grad_rows), part, lay, b0, b1)
    del dropped
    grad_scores = torch.matmul(grad_rows, values.transpose(-1, -2))
    if keep is not None:
        grad_scores.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - dropout))
    # Softmax backward in place: dS = P * (dP - rowsum(dO * O)) (FlashAttention's identity, dropout included).
    grad_scores.sub_(delta).mul_(probs)
    del probs, keep
    grad_rows_q = torch.matmul(grad_scores, keys).mul_(scale)
    _put_rows(grad_q, _unfold_rows(grad_rows_q, heads), part, lay, b0, b1, add=True)
    _scatter_keys(grad_k, torch.matmul(grad_scores.transpose(-1, -2), q_rows), part, lay, b0, b1)
