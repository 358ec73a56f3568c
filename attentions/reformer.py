"""Reformer LSH attention with shared query/key (Kitaev, Kaiser & Levskaya 2020, "Reformer").

Per hash round ``r`` (all rounds are computed as one batched tensor, no Python loop over chunks):

1. Angular LSH: ``h_r(x) = argmax([x R_r ; -x R_r])`` with a random Gaussian ``R_r`` of shape
   ``(head_dim, num_buckets / 2)`` per head and round, drawn once from ``seed`` (buffer ``rotations``).
   The bucket is computed from the query ``q``.
2. Tokens are sorted by ``(bucket, position)`` and split into chunks of ``bucket_size`` tokens; each
   chunk attends to itself and to the previous chunk (the first chunk has no previous chunk: no
   wrap-around, which would let the last, possibly padded, chunk leak into the first).
3. Scores are ``q_i . k_j / sqrt(head_dim)`` with unit-normalised keys ``k_j = k_j / |k_j|``. Keys are
   shared with queries: the backbone ties the query and key projections for ``shared_qk`` mechanisms,
   so ``k == q`` and the keys are the unit-normalised queries, exactly as in the paper. The ``k``
   argument is still what gets normalised (rather than ``q``) so that the key path carries its own
   gradient to the tied projection; hashing always uses ``q``. Called with ``k != q`` the mechanism
   stays well defined (buckets from ``q``, keys from ``k``) but is no longer LSH-consistent.
4. A token attends to itself only when nothing else is available: ``-1e5`` is added to its self score
   (the paper sets it to ``-1e5``; adding gives the same result wherever another key exists, and
   ``v_i`` when none does). Blocked pairs get ``-1e9`` added (padded keys, the first chunk's missing
   previous chunk, and with ``attend_across_buckets=False`` pairs from different buckets): their
   ``exp`` is exactly 0 and all-blocked (padding) rows stay finite. In fp16 the two values are
   ``-1e4`` and ``-3e4``. The default ``attend_across_buckets=True`` keeps every pair of the chunk
   window, as the paper's chunked attention set and the trax/reformer-pytorch defaults do.
5. Rounds are combined with weights ``softmax_r(logsumexp_r)``. With ``dedup_pairs=True`` a (query,
   key) pair that shares a chunk window in ``c`` of the rounds has ``log c`` subtracted from its score
   in each of them, so the result is exact softmax attention restricted to the union of the rounds'
   windows (each key counted once). ``dedup_pairs=False`` counts such a pair ``c`` times (cheaper).

Padding: padded inputs are zeroed first (nothing can depend on them; their gradient is exactly 0),
and a padded token is sent to bucket ``num_buckets``, after every real bucket, so real tokens sort
first, in an order and with chunk boundaries that do not depend on how much padding follows or what
it holds. ``num_buckets`` must therefore not depend on the actual length: it is given, or derived
from ``max_seq_len`` as the paper's ``n / bucket_size``, rounded up to an even number (at least 2).
Lengths that are not a multiple of ``bucket_size`` are padded internally the same way.

Causal (``causal=True``): the paper's language models mask, inside the chunk windows, every key at
a later position than the query. That alone is not causal in the strict sense: which earlier keys
share a query's chunk depends on how many later tokens sort before it (they move chunk boundaries),
so the output at ``i`` would change with the tokens after ``i``. Ours keeps the paper's mask and
makes the key set a function of the past: a query attends to the keys of its own bucket (causal
implies ``attend_across_buckets=False``) that are at most ``bucket_size`` sorted slots before it,
i.e. its last ``<= bucket_size`` same-bucket predecessors, and itself only when nothing else is
there. Still one chunk plus one look-back chunk per query, same cost; ``dedup_pairs`` counts the
rounds in which a pair shares such a window.

Dropout (``dropout``) is applied to each round's attention probabilities in training mode; the mask of
chunk ``j`` of round ``r`` is drawn from ``(seed, r * chunks + j)`` (:mod:`attentions._dropout`), so it can be
rebuilt in backward instead of stored.

Memory: with ``recompute=True`` (the default) the whole computation is one autograd function
(:mod:`attentions._lsh_recompute`) that keeps ``O(n d + n_hashes n)`` for backward and rebuilds each round's
chunk scores there, a few chunks at a time; ``recompute=False`` is the stored form, which keeps the
``O(n_hashes * n * bucket_size)`` probabilities, gathered keys and values and bias. Both compute the same
function (outputs and gradients equal to float rounding); no ``seq x seq`` tensor is formed by either.

Rotary positions (``model.pos_emb=rope``, ``attentions.rotary``): the backbone rotates the shared query-key tensor once
(``k is q`` still holds), so the keys are the unit-normalised rotated queries and a kept score is
``(R_i q_i)^T R_j q_j / |q_j| = q_i^T R_(j-i) q_j / |q_j|`` (RoFormer eq. 16). Hashing sees the rotated vectors:
angular LSH makes ``R_i q_i`` and ``R_j q_j`` collide with a probability set by their angle, which is that of ``q_i``
and ``R_(j-i) q_j``, so which pairs share a bucket depends on the offset in distribution over the random rotations;
for one draw, a token's bucket depends on its absolute position (equal tokens far apart may part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._dropout import draw_seed
from ._lsh_recompute import KEY_EPS, LshAttention, LshPlan, chunk_keep_mask
from .base import Attention
from .decoding import DecodeState, write_positions
from .registry import AttentionConfig, register_attention, require


@dataclass(frozen=True)
class ReformerConfig(AttentionConfig):
    """``bucket_size``: chunk length (paper: 64). ``n_hashes``: hash rounds (paper sweeps 1, 2, 4, 8;
    4 is the default here, LRA's JAX code uses 1, reformer-pytorch 8). ``num_buckets``: even, or None
    to derive ``max_seq_len / bucket_size`` (rounded up to even). ``recompute``: rebuild the chunk scores
    in backward (memory ``O(n d)`` beside the inputs; time 0.9-1.2x the stored form's, measured) rather than keep them
    (``O(n_hashes n bucket_size)``); it changes memory and time, not results."""

    bucket_size: int = 64
    n_hashes: int = 4
    num_buckets: int | None = None
    attend_across_buckets: bool = True
    dedup_pairs: bool = True
    recompute: bool = True

    def validate(self) -> None:
        require(self.bucket_size >= 1, "bucket_size", f"must be >= 1, got {self.bucket_size}")
        require(self.n_hashes >= 1, "n_hashes", f"must be >= 1, got {self.n_hashes}")
        if self.num_buckets is not None:
            require(
                self.num_buckets >= 2 and self.num_buckets % 2 == 0,
                "num_buckets",
                f"must be an even integer >= 2 (angular LSH hashes to argmax([xR; -xR])) or None, "
                f"got {self.num_buckets}",
            )
        else:
            require(
                self.max_seq_len is not None,
                "max_seq_len",
                "reformer derives num_buckets = max_seq_len / bucket_size from it (a bucket count that "
                "depended on the actual length would let padding move real tokens); give max_seq_len "
                "or an even num_buckets",
            )

    @property
    def resolved_num_buckets(self) -> int:
        """The bucket count actually used (see the class docstring)."""
        if self.num_buckets is not None:
            return self.num_buckets
        return max(2, 2 * math.ceil(self.max_seq_len / (2 * self.bucket_size)))


def reformer_state_size(config: ReformerConfig, seq_len: int) -> int:
    """``2 d`` times the capacity of a query's chunk windows over the ``n_hashes`` rounds: per round its own
    chunk and the previous one, ``2 bucket_size - 1`` keys besides itself (causal: its last ``<= bucket_size``
    same-bucket predecessors), at most ``n - 1`` distinct keys; the query itself only when it sees no
    other (``n = 1``). An upper bound: which keys share a window depends on the hashes, and the rounds'
    windows may overlap; a single round (``n_hashes=1``, across buckets, ``n >= 2 bucket_size``) reaches it.
    """
    per_round = config.bucket_size if config.causal else 2 * config.bucket_size - 1
    return 2 * config.head_dim * max(1, min(seq_len - 1, config.n_hashes * per_round))


@register_attention(
    "reformer",
    config=ReformerConfig,
    family="hashing",
    rotary_note="q and k are one tensor, rotated once (k stays q); scores q_i^T R_(j-i) k_j / |k_j| are RoPE's, and "
                "the hashes of R_i q_i and R_j q_j collide with a probability set by the angle between q_i and R_(j-i) "
                "q_j: relative in distribution over the random rotations, one draw's buckets depend on positions",
    supports_causal=True,
    causal_note="LSH attention to the last <= bucket_size same-bucket predecessors; never a later position",
    time_complexity="O(n_hashes * n * (bucket_size * d + log n) + n_hashes * n * num_buckets * d)",
    memory_complexity="O(n_hashes * n * bucket_size)",
    needs_max_seq_len=True,
    shared_qk=True,
    grouped_kv="refused",
    grouped_kv_note="its keys are its queries (one shared query-key projection, Kitaev et al. 2020 sec. 2), so they "
                    "have as many heads as the queries",
    state_size_fn=reformer_state_size,
    supports_decoding=True,
    decoding_note="a KV cache plus, per hash round and bucket, the positions of its last bucket_size tokens: a step "
                  "reads exactly the causal form's key set (its last <= bucket_size same-bucket predecessors, itself "
                  "at -1e5, pairs deduplicated over rounds), O(n_hashes bucket_size d) per token",
    state_growth="linear",
)
class ReformerAttention(Attention):
    """LSH attention with shared query/key and multi-round hashing (Kitaev et al. 2020)."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.num_buckets = config.resolved_num_buckets
        self.register_buffer("rotations", self._draw_rotations(config.seed))

    def _draw_rotations(self, seed: int) -> torch.Tensor:
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        shape = (cfg.num_heads, cfg.n_hashes, cfg.head_dim, self.num_buckets // 2)
        return torch.randn(shape, generator=g)

    @torch.no_grad()
    def redraw_rotations(self, seed: int) -> None:
        """Replace the random rotations by a fresh draw from ``seed`` (the only way they change)."""
        self.rotations.copy_(self._draw_rotations(seed))

    @torch.no_grad()
    def hash(self, q: torch.Tensor) -> torch.Tensor:
        """Bucket of every token in every round: ``(batch, heads, seq, d)`` -> ``(batch, heads, n_hashes, seq)``.

        Computed in float32 for any input dtype (buckets must not depend on the compute dtype).

        ``argmax([xR; -xR])`` without building the concatenation: the winner is the max of ``xR``
        unless ``-min(xR)`` is larger (ties go to the first half, as argmax would). The ``seq x
        num_buckets / 2`` projections are made one round and one slice of the sequence at a time, each
        no larger than a round's ``seq x 2 * bucket_size`` scores: ``num_buckets`` grows with
        ``max_seq_len``, and the hashing transient would otherwise grow quadratically.
        """
        half = self.num_buckets // 2
        piece = max(1, q.shape[-2] * 2 * self.config.bucket_size // half)
        q = q.float()  # bf16, fp16, fp32 and fp64 copies of the same values must hash alike
        rotations = self.rotations.float()
        out = []
        for r in range(self.config.n_hashes):
            parts = []
            for q_part in q.split(piece, dim=-2):
                proj = torch.matmul(q_part, rotations[None, :, r])  # (b, h, piece, half)
                top, arg_top = proj.max(dim=-1)
                low, arg_low = proj.min(dim=-1)
                parts.append(torch.where(top >= -low, arg_top, arg_low + half))
            out.append(torch.cat(parts, dim=-1))
        return torch.stack(out, dim=2)

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        batch, heads, n, d = q.shape
        c, nb = cfg.bucket_size, self.num_buckets
        n_pad = -(-n // c) * c
        # Padded slots of q, k, v arrive zeroed (Attention.forward): nothing downstream can depend
        # on them (not even through a -1e9 bias), and the gradient to padded inputs is exactly zero.
        real = q.new_ones(batch, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
        if n_pad > n:
            shared = k is q
            q, v = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, v))
            k = q if shared else F.pad(k, (0, 0, 0, n_pad - n))  # one padded copy of a shared query/key
            real = F.pad(real, (0, n_pad - n), value=False)

        with torch.no_grad():
            buckets = self.hash(q).masked_fill(~real[:, None, None, :], nb)  # padding sorts last
            positions = torch.arange(n_pad, device=q.device)
            sort_idx = (buckets * n_pad + positions).argsort(dim=-1)  # (b, h, r, n_pad): sorted slot -> token
            rank = torch.empty_like(sort_idx).scatter_(-1, sort_idx, positions.expand_as(sort_idx))
        p = cfg.dropout if self.training else 0.0
        seed = draw_seed() if p > 0.0 else 0
        if cfg.recompute:
            self_value, mask_value = self._bias_values(q.dtype)
            plan = LshPlan(sort_idx=sort_idx.int(), rank=rank.int(), buckets=buckets.int(), bucket_size=c,
                           num_buckets=nb, attend_across_buckets=cfg.attend_across_buckets and not cfg.causal,
                           causal=cfg.causal, dedup_pairs=cfg.dedup_pairs, self_value=self_value, mask_value=mask_value)
            out = LshAttention.apply(q, k, v, plan, p, seed)
        else:
            out = self._stored(q, k, v, buckets, sort_idx, rank, p, seed)
        return out if n_pad == n else out[:, :, :n]  # a full-length slice would cost a copy in backward

    def _stored(self, q, k, v, buckets, sort_idx, rank, p: float, seed: int) -> torch.Tensor:
        """The stored form (``recompute=False``): every round at once, autograd keeps the pair-sized tensors."""
        cfg = self.config
        batch, heads, n_pad, d = q.shape
        c, rounds = cfg.bucket_size, cfg.n_hashes
        n_chunks = n_pad // c
        with torch.no_grad():
            chunked_idx = sort_idx.view(batch, heads, rounds, n_chunks, c)
            window_idx = _look_one_back(chunked_idx)  # (b, h, r, chunks, 2c): the keys each chunk sees
            bias = self._score_bias(buckets, chunked_idx, window_idx, q.dtype)
            counts = None
            if cfg.dedup_pairs and rounds > 1:
                counts = self._window_counts(buckets, sort_idx, rank).to(q.dtype)

        def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            # (b, h, n_pad, d) at idx (b, h, r, chunks, m) -> (b, h, r, chunks, m, d); one gather for all rounds.
            flat = idx.reshape(batch, heads, -1, 1).expand(-1, -1, -1, d)
            return t.gather(2, flat).view(*idx.shape, d)

        # Scale the (small) queries rather than the (large) score tensor.
        sq = gather(q * d**-0.5, chunked_idx)
        sk = gather(F.normalize(k, dim=-1, eps=1e-6), window_idx)
        sv = gather(v, window_idx)
        scores = torch.matmul(sq, sk.transpose(-1, -2))  # (b, h, r, chunks, c, 2c)
        for term in bias:
            scores = scores.add_(term)  # constants: autograd stores nothing for these
        probs, lse = _WeightedSoftmax.apply(scores, counts)  # in place: scores is consumed
        if p > 0.0:
            shape = (batch, heads, c, 2 * c)
            keep = torch.stack([chunk_keep_mask(seed, r, 0, n_chunks, n_chunks, shape, p, q.device)
                                for r in range(rounds)], dim=2)
            probs = probs.masked_fill(~keep, 0.0) * (1.0 / (1.0 - p))
        out = torch.matmul(probs, sv).view(batch, heads, rounds, n_pad, d)

        # Unsort: token t of round r sits at sorted slot rank[r, t].
        out = out.gather(3, rank[..., None].expand(-1, -1, -1, -1, d))
        if rounds == 1:
            return out[:, :, 0]
        lse = lse.view(batch, heads, rounds, n_pad).gather(3, rank)
        weights = torch.softmax(lse, dim=2)
        return (out * weights[..., None]).sum(dim=2)

    @staticmethod
    def _bias_values(dtype: torch.dtype) -> tuple[float, float]:
        """``(self_value, mask_value)``: -1e5 and -1e9, or -1e4 and -3e4 where -1e9 would overflow (fp16)."""
        if torch.finfo(dtype).max > 1e10:
            return -1e5, -1e9
        return -1e4, -3e4

    @torch.no_grad()
    def _score_bias(
        self, buckets: torch.Tensor, chunked_idx: torch.Tensor, window_idx: torch.Tensor, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Additive constants for the ``(b, h, r, chunks, c, 2c)`` scores, as broadcastable terms.

        Blocked pairs (padded key, the first chunk's missing previous chunk, other buckets when they may
        not mix) get ``mask_value``, the self pair ``self_value``. Additive rather than replaced: a
        blocked score is ``s - 1e9`` whose ``exp`` is exactly 0, so output and gradient are those of
        masking, and the in-place add costs autograd nothing.
        """
        cfg = self.config
        c, nb = cfg.bucket_size, self.num_buckets
        self_value, mask_value = self._bias_values(dtype)
        key_bucket = buckets.gather(-1, window_idx.flatten(-2)).view(window_idx.shape)  # (b, h, r, chunks, 2c)
        key_blocked = key_bucket == nb
        key_blocked[:, :, :, 0, c:] = True  # the first chunk has no previous chunk (no wrap-around)
        self_bias = torch.eye(c, 2 * c, dtype=dtype, device=buckets.device) * self_value  # slot i is window key i
        if cfg.attend_across_buckets and not cfg.causal:
            blocked = key_blocked[..., None, :]
        else:
            query_bucket = buckets.gather(-1, chunked_idx.flatten(-2)).view(chunked_idx.shape)
            blocked = key_blocked[..., None, :] | (query_bucket[..., :, None] != key_bucket[..., None, :])
        if cfg.causal:
            blocked |= _causal_blocked(chunked_idx, window_idx)
        return [torch.zeros(blocked.shape, dtype=dtype, device=buckets.device).masked_fill_(blocked, mask_value),
                self_bias]

    @torch.no_grad()
    def _causal_window_counts(self, buckets: torch.Tensor, sort_idx: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """:meth:`_window_counts` for the causal window (see :func:`_causal_blocked`).

        Query i sees key j in round r when they share a bucket and ``0 <= rank_r(i) - rank_r(j) <= c``;
        with ``loc = rank + bucket * 2 n_pad`` that is ``0 <= loc_r(i) - loc_r(j) <= c``.
        """
        c = self.config.bucket_size
        batch, heads, rounds, n_pad = rank.shape
        n_chunks = n_pad // c
        wide = (self.num_buckets + 1) * 2 * n_pad >= 2**31
        loc = (rank + buckets * (2 * n_pad)).to(torch.int64 if wide else torch.int32)
        counts = torch.ones((batch, heads, rounds, n_chunks, c, 2 * c), dtype=torch.uint8, device=rank.device)
        for shift in range(1, rounds):
            other = loc.roll(-shift, dims=2)  # round (r + shift) % rounds, seen in round r's sort order
            sorted_other = other.gather(3, sort_idx).view(batch, heads, rounds, n_chunks, c)
            diff = sorted_other[..., :, None] - _look_one_back(sorted_other)[..., None, :]
            counts.add_(((diff >= 0) & (diff <= c)).view(torch.uint8))
        return counts

    @torch.no_grad()
    def _window_counts(self, buckets: torch.Tensor, sort_idx: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """For every (query, key) pair of every round's window, in how many rounds they share a window.

        A token's location in round r is its chunk (plus a bucket offset when buckets may not mix);
        query i sees key j in round r exactly when ``loc_r(i) - loc_r(j)`` is 0 or 1, i.e. when
        ``(loc_r(i) - loc_r(j)) >> 1 == 0``. The own round always counts, so only the others are looped.
        """
        c = self.config.bucket_size
        batch, heads, rounds, n_pad = rank.shape
        n_chunks = n_pad // c
        if self.config.causal:
            return self._causal_window_counts(buckets, sort_idx, rank)
        loc = torch.div(rank, c, rounding_mode="floor")
        largest = n_chunks
        if not self.config.attend_across_buckets:
            loc = loc + buckets * (2 * n_chunks)  # different buckets then differ by >= n_chunks + 1
            largest += self.num_buckets * 2 * n_chunks
        loc = loc.to(torch.int16 if largest < 2**15 else torch.int32)  # narrow: the diffs are pair-sized
        shape = (batch, heads, rounds, n_chunks, c, 2 * c)
        # Fresh pair-sized buffers are costly (page faults on CPU): allocate each once and reuse it.
        counts = torch.ones(shape, dtype=torch.uint8, device=rank.device)
        diff = torch.empty(shape, dtype=loc.dtype, device=rank.device)
        hit = torch.empty(shape, dtype=torch.bool, device=rank.device)
        for shift in range(1, rounds):
            other = loc.roll(-shift, dims=2)  # round (r + shift) % rounds, seen in round r's sort order
            sorted_other = other.gather(3, sort_idx).view(batch, heads, rounds, n_chunks, c)
            torch.sub(sorted_other[..., :, None], _look_one_back(sorted_other)[..., None, :], out=diff)
            torch.eq(diff.bitwise_right_shift_(1), 0, out=hit)
            counts.add_(hit.view(torch.uint8))
        return counts

    # ------------------------------------------------------------------------------------------- decoding
    # Why a step equals the causal forward. In round r the causal query i sees key j exactly when both hash to
    # the same bucket (hashes come from q; the sort is by (bucket, position)) and 0 <= rank_r(i) - rank_r(j) <=
    # bucket_size: j is i itself or one of its last <= bucket_size same-bucket predecessors (LshPlan.locations).
    # Such a key always lies in i's chunk or the one before, so the chunking adds nothing, and blocked pairs get
    # -1e9, whose exp is exactly 0 beside the self pair's -1e5. The set depends on the past only, so a step can
    # find it directly: per (round, bucket) a ring of the positions of the bucket's last bucket_size tokens. A
    # step hashes q_t (a token's hash is its own: the same buckets as hashing the whole sequence), reads each
    # round's ring plus itself, scores them as the forward does (q scale . k / max(|k|, 1e-6), self -1e5, scores
    # divided by the number of rounds that see the pair), combines rounds by softmax_r(logsumexp_r), then appends
    # itself to its buckets' rings. Keys and values are read from a cache of every position: the per-bucket
    # alternative (k, v copies in each round's bucket buffers) holds up to n_hashes * num_buckets * bucket_size
    # tokens, about n_hashes * max_seq_len with the derived bucket count: more than the cache for n_hashes >= 2.
    # Exact, bounded time per token (n_hashes * (bucket_size + 1) keys); state linear in the context (the cache).

    def new_state(self, batch, max_len, dtype, device):
        cfg = self.config
        return LshDecodeState(batch, max_len, cfg.num_heads, cfg.head_dim, cfg.n_hashes, self.num_buckets,
                              cfg.bucket_size, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state):
        n = q.shape[2]
        if n:
            state.k[:, :, :n], state.v[:, :, :n] = k, v
            buckets = self.hash(q)
            if key_padding_mask is not None:  # padding joins no bucket
                buckets = buckets.masked_fill(~key_padding_mask[:, None, None, :], self.num_buckets)
            state.fill_rings(buckets)
        return self.attend(q, k, v, key_padding_mask) if n else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        pos = state.lengths
        write_positions((state.k, state.v), (k, v), pos)
        buckets = self.hash(q)[..., 0]  # (b, h, rounds)
        seen, valid = state.window(buckets, pos)  # (b, h, rounds, c + 1): positions, and which are real
        dtype = torch.promote_types(state.k.dtype, torch.float32)
        rounds = seen.shape[2]
        keys, values = (state.rows(t, seen).to(dtype) for t in (state.k, state.v))  # (b, h, rounds, c + 1, d)
        keys = keys / torch.linalg.vector_norm(keys, dim=-1, keepdim=True).clamp_min(KEY_EPS)
        scores = torch.einsum("bhd,bhrjd->bhrj", q[:, :, 0].to(dtype) * q.shape[-1] ** -0.5, keys)
        scores[..., -1] += self._bias_values(dtype)[0]  # the last key is the query itself
        scores = scores.masked_fill(~valid, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True)  # finite: the self pair is always there
        probs = (scores - top).exp_()
        if self.config.dedup_pairs and rounds > 1:
            probs.div_(_rounds_seeing(seen, valid).to(probs.dtype))
        total = probs.sum(dim=-1, keepdim=True)
        out = torch.einsum("bhrj,bhrjd->bhrd", probs / total, values)
        if rounds > 1:
            weights = torch.softmax((top + total.log())[..., 0], dim=-1)  # softmax_r(logsumexp_r)
            out = torch.einsum("bhr,bhrd->bhd", weights, out)
        else:
            out = out[:, :, 0]
        state.append(buckets, pos)
        return out[:, :, None].to(q.dtype)


class LshDecodeState(DecodeState):
    """Reformer's decoding state.

    ``k``, ``v`` ``(batch, heads, max_len, d)``: every position's key and value (input dtype; counted as filled);
    ``rings`` ``(batch, heads, n_hashes, num_buckets, bucket_size)`` int32: per round and bucket the positions of
    its last ``bucket_size`` tokens, the ``i``-th token of a bucket at slot ``i % bucket_size``; ``counts``
    ``(batch, heads, n_hashes, num_buckets)`` int32: tokens per bucket so far. :meth:`nbytes` counts the ring
    entries filled (``min(count, bucket_size)`` per bucket), ``counts`` whole.
    """

    positional = ("k", "v")

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, rounds: int, buckets: int, c: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(batch, max_len, device)
        self.k, self.v = (torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(2))
        self.rings = torch.zeros(batch, heads, rounds, buckets, c, dtype=torch.int32, device=device)
        self.counts = torch.zeros(batch, heads, rounds, buckets, dtype=torch.int32, device=device)

    @property
    def bucket_size(self) -> int:
        return self.rings.shape[-1]

    @staticmethod
    def rows(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``cache[b, h, positions[b, h, ...]]``: ``(b, h, L, d)`` at ``(b, h, r, w)`` -> ``(b, h, r, w, d)`` (one
        index_select on the flattened cache: several times faster than a gather with an expanded index)."""
        batch, heads, length, dim = cache.shape
        base = (torch.arange(batch * heads, device=cache.device) * length).view(batch, heads, 1, 1)
        flat = (positions.clamp_min(0) + base).view(-1)
        return cache.reshape(-1, dim).index_select(0, flat).view(*positions.shape, dim)

    def nbytes(self) -> int:
        filled = int(self.counts.clamp(max=self.bucket_size).sum()) * self.rings.element_size()
        return super().nbytes() - self.rings.numel() * self.rings.element_size() + filled

    def window(self, buckets: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a new token at ``pos`` ``(b,)`` with ``buckets`` ``(b, h, rounds)`` sees in each round: the positions
        ``(b, h, rounds, c + 1)`` of its bucket's last ``c`` tokens, then its own; and which of them exist."""
        c = self.bucket_size
        index = buckets.long()[..., None]
        counts = self.counts.gather(3, index)  # (b, h, r, 1)
        ring = self.rings.gather(3, index[..., None].expand(-1, -1, -1, -1, c))[:, :, :, 0]  # (b, h, r, c)
        own = pos[:, None, None, None].expand(*ring.shape[:3], 1).to(ring.dtype)
        seen = torch.cat([ring, own], dim=-1).long()
        valid = torch.arange(c + 1, device=pos.device) < counts.clamp(max=c)
        valid[..., -1] = True
        return seen, valid

    def append(self, buckets: torch.Tensor, pos: torch.Tensor) -> None:
        """Record the token at ``pos`` ``(b,)`` as the newest of its bucket in each round (``buckets`` (b, h, r))."""
        index = buckets.long()[..., None]
        counts = self.counts.gather(3, index)
        slot = (index * self.bucket_size + counts.long() % self.bucket_size)  # into the flattened (buckets, c)
        flat = self.rings.view(*self.rings.shape[:3], -1)
        flat.scatter_(3, slot, pos[:, None, None, None].expand_as(slot).to(flat.dtype))
        self.counts.scatter_add_(3, index, torch.ones_like(counts))

    def fill_rings(self, buckets: torch.Tensor) -> None:
        """The rings and counts after a prompt whose tokens hash to ``buckets`` ``(b, h, rounds, n)`` (``num_buckets``
        for padding): each bucket's last ``c`` tokens, its ``i``-th at slot ``i % c``."""
        c, nb = self.bucket_size, self.rings.shape[3]
        n = buckets.shape[-1]
        positions = torch.arange(n, device=buckets.device)
        order = (buckets * n + positions).argsort(dim=-1)  # by (bucket, position), as the forward sorts
        sorted_buckets = buckets.gather(-1, order)
        index = positions - torch.searchsorted(sorted_buckets, sorted_buckets)  # i-th token of its bucket
        counts = torch.zeros(*buckets.shape[:3], nb + 1, dtype=torch.long, device=buckets.device)
        counts.scatter_add_(3, buckets, torch.ones_like(buckets))
        keep = (sorted_buckets < nb) & (index >= counts.gather(3, sorted_buckets) - c)
        dump = nb * c  # one extra column takes the tokens that are not kept
        slot = torch.where(keep, sorted_buckets * c + index % c, torch.full_like(index, dump))
        rings = torch.zeros(*buckets.shape[:3], dump + 1, dtype=self.rings.dtype, device=buckets.device)
        rings.scatter_(3, slot, order.to(rings.dtype))
        self.rings.copy_(rings[..., :dump].view_as(self.rings))
        self.counts.copy_(counts[..., :nb])


def _rounds_seeing(seen: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """For each (round, key) of a step's windows ``(b, h, rounds, w)``, in how many rounds the key is seen (>= 1;
    the value at an invalid entry is meaningless, its probability is 0). A binary search of each round's positions
    in every round's sorted positions: O(rounds^2 w log w), not the O(rounds^2 w^2) of all pairs."""
    batch, heads, rounds, width = seen.shape
    marked = seen.masked_fill(~valid, -1)  # no real position is -1
    shape = (batch, heads, rounds, rounds, width)  # [r, r']: round r's keys looked up in round r'
    ordered = marked.sort(dim=-1).values[:, :, None].expand(shape).contiguous()
    wanted = marked[:, :, :, None].expand(shape).contiguous()
    found = ordered.gather(-1, torch.searchsorted(ordered, wanted).clamp_(max=width - 1)) == wanted
    return found.sum(dim=3)


def _causal_blocked(chunked_idx: torch.Tensor, window_idx: torch.Tensor) -> torch.Tensor:
    """Pairs a causal query may not see: ``(b, h, r, chunks, c, 2c)``, True = blocked.

    A later position (whatever its bucket), and any key more than ``c`` sorted slots before the query.
    With same-bucket attention (which causal implies) the keys left are the query's last ``<= c``
    same-bucket predecessors: a set fixed by the inputs up to the query, so later tokens (which shift
    chunk boundaries) cannot change it.
    """
    n_chunks, c = chunked_idx.shape[-2:]
    slots = torch.arange(n_chunks * c, device=chunked_idx.device).view(1, 1, 1, n_chunks, c)
    behind = slots[..., :, None] - _look_one_back(slots)[..., None, :]  # query slot - key slot
    later = window_idx[..., None, :] > chunked_idx[..., :, None]
    return later | (behind < 0) | (behind > c)


def _look_one_back(x: torch.Tensor) -> torch.Tensor:
    """``(b, h, r, chunks, c, ...)`` -> ``(b, h, r, chunks, 2c, ...)``: each chunk followed by the previous one.

    Chunk 0 gets the last chunk in its second half; callers mask it (no wrap-around).
    """
    return torch.cat([x, x.roll(1, dims=3)], dim=4)


class _WeightedSoftmax(torch.autograd.Function):
    """``p_j = exp(s_j) / m_j / sum_k exp(s_k) / m_k`` and its log-normaliser, over the last dim.

    ``m`` (or None for all ones) is the constant multiplicity of each pair (``dedup_pairs``). Works in
    place on ``scores`` and saves only the probabilities: ``d lse / d s = p`` and the softmax Jacobian
    give ``grad_s = p * (g - <g, p> + g_lse)``. Autograd through ``torch.logsumexp`` would keep
    the score tensor alive as well, and every fresh ``seq x bucket_size`` buffer costs time.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, multiplicity: torch.Tensor | None):
        top = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(top).exp_()
        if multiplicity is not None:
            probs.div_(multiplicity)
        total = probs.sum(dim=-1, keepdim=True)
        probs.div_(total)
        lse = (top + total.log()).squeeze(-1)
        ctx.mark_dirty(scores)
        ctx.save_for_backward(probs)
        return probs, lse

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor, grad_lse: torch.Tensor):
        (probs,) = ctx.saved_tensors
        dot = torch.matmul(grad_probs.unsqueeze(-2), probs.unsqueeze(-1)).squeeze(-1)  # <g, p> per row
        grad = grad_probs - (dot - grad_lse[..., None])
        return grad.mul_(probs), None
