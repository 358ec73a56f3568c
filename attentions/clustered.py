"""Clustered attention (Vyas et al. 2020, "Fast Transformers with Clustered Attention").

Queries are grouped into C = ``num_clusters`` clusters per (batch, head); softmax attention
is computed once per centroid and every query takes its centroid's result.

Clustering: Euclidean k-means on the raw queries (``kmeans_iterations`` Lloyd steps), not
the paper's LSH codes + Hamming k-means: at head dims of 32-64 exact distances are cheap
(an ``n x C`` matrix per step, the same order as the attention itself) and cluster better.
Initial centroids are C real queries picked by a per-head pseudo-random order of positions,
``frac(position * golden_ratio + phase[head])`` with ``phase`` drawn from ``seed`` (a
buffer): no global RNG, and the choice depends only on the real positions, so appended
padding cannot change it. Padded queries are excluded from clustering (they never move a
centroid). When C >= the number of real queries every query is its own cluster, which
makes the result exact attention. An emptied cluster keeps its previous centroid.

``improved`` (i-clustered): each cluster keeps the ``topk`` keys its centroid attends to
most; every query recomputes exact softmax attention on those keys, scaled to the mass
the centroid gave them, and takes the centroid's attention for the other keys:

    out_i = m_j * softmax(q_i K_top / sqrt(d)) V_top + (A_j V - A_j[top] V_top),
    m_j = sum_{top} A_j,   j = cluster of query i.

Gradients: the assignment and the top-k choice are discrete (no gradient). Centroids are
recomputed differentiably as the mean of their members' queries, so a query's gradient is
its cluster's centroid gradient divided by the cluster size; keys and values get the
centroid attention's gradients, plus (improved) the exact top-k attention's.

Cost: O(n C d) per Lloyd step and for the centroid attention (+ O(n k d) improved).
Memory O(n d): k-means distances are computed for chunks of queries (a bounded buffer) and
plain clustered runs the centroid attention in PyTorch's fused SDPA; improved needs the
explicit (C x n) centroid probabilities (O(n C)) and the gathered top keys/values (O(n k d)).
Never an n x n tensor (unless C >= n, where the centroids are the queries themselves).
``dropout`` drops centroid attention probabilities (and the per-query top-k
probabilities when improved) in training mode.

Rotary positions (``model.pos_emb=rope``, ``attentions.rotary``): the backbone rotates q and k before this mechanism,
so k-means groups the rotated queries ``R_i q_i``: content and position together (a token's query drifts across
clusters with its position). A query takes its centroid's attention, scores ``c^T R_j k_j`` for the mean ``c`` of its
cluster's rotated queries, not its own ``q_i^T R_(j-i) k_j`` (RoFormer eq. 16): relative only as far as the cluster's
members agree, exact for a query alone in its cluster and, with ``improved``, for its recomputed top-k keys.

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): the clusters are of queries, so
they stay per query head (k-means on each head's queries); only the keys and values are shared. The centroids of
the ``g`` query heads of key-value head ``j`` attend to its keys as rows of one head
(``attentions._grouped.query_rows``: one grouped SDPA call or matmul, keys never repeated), and ``improved``
gathers each query head's top keys from its key-value head. No causal form, so no decoding state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dropout import draw_seed
from ._full_chunked import chunked_attention, chunked_attention_stored
from ._grouped import query_rows
from .base import Attention
from .registry import AttentionConfig, register_attention, require

GOLDEN_RATIO = (math.sqrt(5.0) - 1.0) / 2.0
# Distances are computed for about this many (query, centroid) pairs at a time (4 MiB in fp32).
ASSIGN_CHUNK_ELEMENTS = 1 << 20
# Scores per chunk of the centroid attention with dropout (attentions._full_chunked): 1 MiB in float32.
CENTROID_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class ClusteredConfig(AttentionConfig):
    num_clusters: int = 100
    kmeans_iterations: int = 10
    improved: bool = False
    topk: int = 32
    # With dropout in training: recompute the centroid attention's chunks in backward (memory O(n d) beside the
    # inputs) rather than keep its (C, n) probabilities; it changes memory and time, not results. Without dropout
    # the fused SDPA kernel runs either way.
    recompute: bool = True

    def validate(self) -> None:
        require(self.num_clusters >= 1, "num_clusters", f"must be >= 1, got {self.num_clusters}")
        require(self.kmeans_iterations >= 0, "kmeans_iterations", f"must be >= 0, got {self.kmeans_iterations}")
        require(self.topk >= 1, "topk", f"must be >= 1 (keys recomputed per query when improved), got {self.topk}")


def clustered_state_size(config: ClusteredConfig, seq_len: int) -> int:
    """Every key and value, ``2 n d``: clustering compresses the queries, not the keys. A query's output is
    its centroid's softmax attention over all ``n`` keys (plus, ``improved``, exact attention on ``topk`` of
    the same keys), so it is computed from the whole KV set, as full attention's is."""
    return 2 * seq_len * config.head_dim


@register_attention(
    "clustered",
    config=ClusteredConfig,
    family="query-prototyping",
    rotary_note="k-means clusters the rotated queries R_i q_i (content and position together) and a query takes its "
                "centroid's attention, c^T R_j k_j rather than q_i^T R_(j-i) k_j: relative only as far as a cluster's "
                "members agree (exact for a query alone in its cluster, and for improved's top-k keys)",
    time_complexity="O(n C d) (k-means and centroid attention); improved + O(n k d)",
    memory_complexity="O(n d) (fused centroid attention, chunked k-means); improved O(n C + n k d)",
    needs_max_seq_len=False,
    state_size_fn=clustered_state_size,
    causal_note=("clusters and their centroid queries are computed from every position, so each output depends on "
                 "later queries; a causal form would recluster every prefix and lose the linear cost"),
    grouped_kv="shared",
    grouped_kv_note="clusters stay per query head (they are of queries); the centroids of a key-value head's query "
                    "heads attend to its keys as rows of one head, improved's top keys gathered from it",
)
class ClusteredAttention(Attention):
    """Clustered attention: k-means over queries, one softmax attention per centroid."""

    def __init__(self, config: ClusteredConfig) -> None:
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed)
        self.register_buffer("init_phase", torch.rand(config.num_heads, generator=gen, dtype=torch.float64))

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        batch, heads, seq, dim = q.shape
        real = key_padding_mask
        if real is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)

        with torch.no_grad():
            # Discrete choices (clusters, top keys) in float32 whatever the compute dtype, so that
            # copies of the same values in any dtype cluster alike (issue 11).
            q32 = q.detach().float()
            assign, num_slots = self._cluster(q32, real)
        centroids = _cluster_means(q, assign, num_slots)  # differentiable in q

        dropout = cfg.dropout if self.training else 0.0
        index = assign.clamp_max(num_slots - 1)  # padded queries read any slot; their rows are padding
        if not cfg.improved:
            # Only the centroid outputs are needed: the fused kernel never stores the C x n scores.
            allowed = None
            if key_padding_mask is not None:
                # No real key at all (all-padding sequence): attend everywhere to stay finite.
                allowed = (real | ~real.any(dim=-1, keepdim=True))[:, None, None, :]
            # Grouped: the centroids of a key-value head's query heads as rows of it (C rows each).
            rows = query_rows(centroids, k.shape[1])
            if dropout == 0.0:
                centroid_out = F.scaled_dot_product_attention(rows, k, v, attn_mask=allowed)
            else:  # SDPA's dropout leaves its fused kernel on CPU and keeps the (C, n) probabilities
                keys = None if allowed is None else allowed[:, 0, 0]
                attention = chunked_attention if cfg.recompute else chunked_attention_stored
                centroid_out = attention(rows, k, v, keys, False, dropout, draw_seed(), CENTROID_CHUNK_ELEMENTS)
            return _gather_rows(centroid_out.reshape(centroids.shape), index)

        scores = _centroid_scores(centroids, k)  # (b, h, C, n)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # all-padding sequence: no key
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        centroid_out = torch.matmul(query_rows(probs, k.shape[1]), v).reshape(centroids.shape)  # (b, h, C, d)
        if scores.dtype == torch.float32:
            select = scores.detach()
        else:
            with torch.no_grad():  # the float32 scores, computed exactly as the float32 path does
                centroids32 = _cluster_means(q32, assign, num_slots)
                select = _centroid_scores(centroids32, k.detach().float())
                if key_padding_mask is not None:
                    select = select.masked_fill(~real[:, None, None, :], float("-inf"))
        return self._improved(q, k, v, real, select, probs, centroid_out, index, dropout)

    def _cluster(self, q: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Lloyd k-means per (batch, head). Returns cluster ids (padded queries: id = slots) and slots.

        A (batch, head) row whose assignment did not change in a step has converged (the same assignment gives
        the same means, hence the same assignment), so later steps run on the rows still moving only: the same
        result as running every row for ``kmeans_iterations`` steps, with less work once rows settle.
        """
        batch, heads, seq, dim = q.shape
        rows = batch * heads
        slots = min(self.config.num_clusters, seq)
        # Pseudo-random order of positions; padded positions last so they are never picked.
        pos = torch.arange(seq, device=q.device, dtype=torch.float64)
        priority = torch.frac(pos[None, :] * GOLDEN_RATIO + self.init_phase.to(q.device)[:, None])  # (h, n)
        priority = priority[None].expand(batch, heads, seq).masked_fill(~real[:, None, :], float("inf"))
        init = priority.topk(slots, dim=-1, largest=False).indices  # (b, h, slots)
        centroids = torch.gather(q, 2, init[..., None].expand(-1, -1, -1, dim)).view(rows, slots, dim)
        # Sequences with fewer real queries than slots: the surplus slots hold padding and
        # must attract nobody.
        slot_ok = torch.arange(slots, device=q.device)[None, :] < real.sum(-1, keepdim=True)  # (b, slots)
        slot_ok = slot_ok[:, None, :].expand(batch, heads, slots).reshape(rows, slots)
        real = real[:, None, :].expand(batch, heads, seq).reshape(rows, seq)
        q = q.reshape(rows, seq, dim)
        # [q, 1], transposed once for every assignment step: |c|^2 - 2 q.c is then one matmul with [-2c, |c|^2].
        q_aug = torch.cat([q, q.new_ones(rows, seq, 1)], dim=-1).transpose(1, 2).contiguous()  # (rows, d + 1, n)
        assign = self._assign(q_aug, centroids, slot_ok, real)
        moving = None  # all rows
        for _ in range(self.config.kmeans_iterations):
            if moving is None:
                step = _lloyd_step(q, q_aug, assign, centroids, slot_ok, real, slots)
                changed = (step[0] != assign).any(dim=-1)
                assign, centroids = step
                moving = None if bool(changed.all()) else changed.nonzero().squeeze(1)
            else:
                part = (t.index_select(0, moving) for t in (q, q_aug, assign, centroids, slot_ok, real))
                new_assign, new_centroids = _lloyd_step(*part, slots)
                changed = (new_assign != assign.index_select(0, moving)).any(dim=-1)
                assign = assign.index_copy(0, moving, new_assign)
                centroids = centroids.index_copy(0, moving, new_centroids)
                moving = moving[changed]
            if moving is not None and moving.numel() == 0:
                break
        return assign.view(batch, heads, seq), slots

    @staticmethod
    def _assign(q_aug, centroids, slot_ok, real) -> torch.Tensor:
        """Nearest centroid of every query: ``argmin_c |q - c|^2 = argmin_c (|c|^2 - 2 q.c)`` (the ``|q|^2`` term
        is constant per query), ``q_aug = [q, 1]`` as ``(rows, d + 1, n)``, centroids ``(rows, C, d)``; unusable
        slots get ``|c|^2 = inf``.

        The ``(C, chunk)`` distances of a chunk of queries are one bmm with ``[-2c, |c|^2]`` (kept in cache; the
        loop is over blocks, not positions); the argmin is :func:`_first_argmin`. Padded queries get ``slots``.
        """
        rows, slots, dim = centroids.shape
        seq = q_aug.shape[-1]
        c_sq = centroids.square().sum(-1).masked_fill(~slot_ok, float("inf"))
        c_aug = torch.cat([centroids * -2.0, c_sq[..., None]], dim=-1)
        ids = torch.arange(slots, device=q_aug.device, dtype=q_aug.dtype)[:, None]
        chunk = max(1, ASSIGN_CHUNK_ELEMENTS // (rows * slots))
        assign = torch.empty(rows, seq, dtype=torch.long, device=q_aug.device)
        for start in range(0, seq, chunk):
            dist = torch.bmm(c_aug, q_aug[:, :, start:start + chunk])  # (rows, C, chunk)
            assign[:, start:start + chunk] = _first_argmin(dist, ids)
        return assign.masked_fill_(~real, slots)  # padded queries: a trash slot

    def _improved(self, q, k, v, real, scores, probs, centroid_out, index, dropout):
        """i-clustered: exact attention on each cluster's top keys, centroid attention elsewhere."""
        batch, heads, seq, dim = q.shape
        topk = min(self.config.topk, seq)
        top = scores.topk(topk, dim=-1).indices  # (b, h, C, k); padded keys have -inf scores
        top_ok = torch.gather(real[:, None, None, :].expand_as(scores), -1, top)
        top_mass = torch.gather(probs, -1, top)  # (b, h, C, k): centroid probability of each top key
        v_top_c = _gather_keys(v, top)  # (b, h, C, k, d)
        # What the centroid attention gives the non-top keys, per cluster.
        rest = centroid_out - torch.einsum("bhck,bhckd->bhcd", top_mass, v_top_c)
        mass = _top_mass_sum(top_mass, top_ok)  # (b, h, C)

        # Per query: its cluster's top keys, gathered (O(n k d)).
        top_q = _gather_rows(top, index)  # (b, h, n, k)
        ok_q = _gather_rows(top_ok, index)
        k_top = _gather_keys(k, top_q)  # (b, h, n, k, d)
        v_top = _gather_keys(v, top_q)
        s = torch.einsum("bhnd,bhnkd->bhnk", q, k_top) / math.sqrt(dim)
        s = s.masked_fill(~ok_q, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
        if dropout > 0.0:
            p = F.dropout(p, p=dropout)
        exact = torch.einsum("bhnk,bhnkd->bhnd", p, v_top)
        return _gather_rows(mass[..., None], index) * exact + _gather_rows(rest, index)


def _centroid_scores(centroids: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``centroids k^T / sqrt(d)``: centroids ``(b, h, C, d)``, keys ``(b, h_kv, n, d)`` (``h_kv`` dividing ``h``, a
    key-value head's query heads' centroids as rows of it) -> ``(b, h, C, n)``."""
    scores = torch.matmul(query_rows(centroids, k.shape[1]) * (1.0 / math.sqrt(k.shape[-1])), k.transpose(-1, -2))
    return scores.reshape(*centroids.shape[:-1], k.shape[2])


def _top_mass_sum(top_mass: torch.Tensor, top_ok: torch.Tensor) -> torch.Tensor:
    """Centroid probability mass on the real top keys."""
    return (top_mass * top_ok).sum(-1)


def _lloyd_step(q, q_aug, assign, centroids, slot_ok, real, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd step on rows ``(rows, n, d)``: centroids = means of their members (an emptied cluster keeps its
    centroid), then every query to its nearest one. Returns the new assignment and centroids."""
    means, counts = _cluster_means(q[:, None], assign[:, None], slots, with_counts=True)
    centroids = torch.where(counts[:, 0, :, None] > 0, means[:, 0], centroids)
    return ClusteredAttention._assign(q_aug, centroids, slot_ok, real), centroids


def _first_argmin(dist: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``dist.argmin(dim=1)`` (the first index of the minimum), from vectorised reductions: ``(B, C, m)`` -> ``(B, m)``
    long; ``dist`` is consumed. ``ids`` = ``arange(C)`` as a ``(C, 1)`` float column.

    torch's argmin is a scalar loop on CPU, about 10x slower than ``amin``: a third of a training step of the
    k-means at n = 64. Here every entry becomes ``C * sign(d - min) + index``: ``index`` where the minimum is
    reached, ``>= C`` elsewhere, so the smallest is the first minimal index, exactly. A column with no finite
    entry (no usable slot: only padded queries, whose ids are replaced) gives 0.
    """
    low = dist.amin(dim=1, keepdim=True)
    key = dist.sub_(low).sign_().mul_(float(dist.shape[1])).add_(ids)
    return key.amin(dim=1).nan_to_num_(0.0).long()


def _cluster_means(q: torch.Tensor, assign: torch.Tensor, slots: int, with_counts: bool = False):
    """Mean of each cluster's (real) queries, ``(b, h, slots, d)``; slot ``slots`` collects padding and is
    dropped. Differentiable in ``q`` (one ``index_add`` over the flattened rows: its backward is one
    ``index_select``). ``with_counts``: also the member counts ``(b, h, slots)``."""
    batch, heads, seq, dim = q.shape
    rows = batch * heads * (slots + 1)
    flat = (assign + torch.arange(batch * heads, device=q.device).view(batch, heads, 1) * (slots + 1)).view(-1)
    sums = q.new_zeros(rows, dim).index_add(0, flat, q.reshape(-1, dim)).view(batch, heads, slots + 1, dim)
    counts = torch.bincount(flat, minlength=rows).view(batch, heads, slots + 1)[..., :slots]
    means = sums[:, :, :slots] / counts.clamp_min(1).to(q.dtype)[..., None]
    return (means, counts) if with_counts else means


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (b, h, C, *rest), index: (b, h, n) -> (b, h, n, *rest); one index_select over the flattened rows
    (a gather with an index expanded over ``rest`` reads an index per element)."""
    batch, heads, rows = x.shape[:3]
    rest = x.shape[3:]
    flat = (index + torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * rows).view(-1)
    return x.reshape(batch * heads * rows, -1).index_select(0, flat).view(*index.shape, *rest)


def _gather_keys(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (b, h_kv, n, d), index: (b, h, r, k) -> (b, h, r, k, d); ``h_kv`` divides ``h`` (grouped-query attention:
    query head ``i`` reads key-value head ``i // (h / h_kv)``, its index rows taken as rows of that head)."""
    batch, heads, rows, kk = index.shape
    kv = x.shape[1]
    out = torch.gather(x, 2, index.reshape(batch, kv, heads // kv * rows * kk, 1).expand(-1, -1, -1, x.shape[-1]))
    return out.view(batch, heads, rows, kk, x.shape[-1])
