"""Attention Free Transformer (Zhai et al. 2021, arXiv:2105.14103).

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_{t,t'}) V_t' / sum_t' exp(K_t' + w_{t,t'})

element-wise over channels. The contract hands us ``(batch, heads, seq, head_dim)``; every
(head, channel) pair is one AFT channel, so heads only group channels. The position biases
``w`` are shared by all heads and channels, as in the paper (one ``T x T`` matrix per layer).

Modes:

- ``simple``: no biases; a per-channel softmax over keys, O(n d) time and memory.
- ``local``: biases only where ``|t - t'| < window``, fixed at 0 elsewhere (the paper's
  AFT-local). Our biases are *relative*: ``w_{t,t'} = rel_bias[t' - t + window - 1]``
  (2 * window - 1 learned numbers), so the mode works at any length and needs no
  ``max_seq_len``. The sums split into the window, ``exp(w) * exp(K) V`` as a banded
  Toeplitz product done as block GEMMs over the sequence, and the rest, weight 1, as a
  prefix plus a suffix cumulative sum: O(n d max(window, 32)) time, O(n d) memory. The
  blocks are max(32, 2 * window) long (capped at n), so a window of the order of n uses an
  (n, n)-sized band block: at that size "local" costs what "full" does. (Not the simple
  sums plus an ``(exp(w) - 1)`` correction: with biases far below 0 that difference of
  nearly equal sums cancelled in float32.)
- ``full``: learned pairwise biases ``w`` of shape ``(max_seq_len, max_seq_len)``; the sums
  are two matmuls ``exp(w) @ (exp(K) * V)`` and ``exp(w) @ exp(K)``: O(n^2 d) time,
  O(n^2) memory for ``exp(w)``, O(batch n^2) when a padding mask is given (row maxima over
  each sequence's real keys); never an ``(n, n, d)`` tensor. The ``K`` and ``w`` shifts
  are separate, so only extreme biases *and* keys together can underflow a row.

The default is ``local`` (window 32): linear in n, position-aware, no ``max_seq_len``.
Stability: ``K`` minus its per-channel maximum over real keys before ``exp``; in ``full``
mode ``w`` minus its per-row maximum over real keys, in ``local`` mode the biases shifted
only when ``exp`` would leave float32's range; every shift cancels between numerator and
denominator. Learned biases start small (normal, std ``bias_init_std``, drawn from
``seed``) rather than at exactly 0, so the position path is exercised from the start.

Causal (``causal=True``): the paper's autoregressive form (used for its image and character
language models): every sum runs over ``t' <= t``. ``simple``: cumulative sums,
O(n d); ``local``: the window's left half (offsets ``-s < t' - t <= 0``) plus a prefix sum of the
rest, O(n d max(s, 32)); ``full``: ``exp(w)`` masked to the lower triangle. The key shift is the
maximum over all real keys (detached: no gradient to later keys); where a later key exceeds all
earlier ones of a channel by more than ``FP32_EXCESS`` nats the sums are taken in float64, so a row
never underflows for want of its own keys.

``dropout``: AFT has no attention probabilities, so ``dropout`` is accepted (one harness
setting for every mechanism) and does nothing here.

Rotary positions: ``model.pos_emb=rope`` is refused for aft (info ``rotary='refused'``; ``harness.model.ModelConfig``
says so). RoPE acts through a query-key dot product (RoFormer eq. 16) and AFT has none: ``sigmoid(Q_t)`` gates and
``exp(K_t')`` weights channel by channel, so rotating q and k would only mix pairs of channels by absolute position.
AFT's positions are its biases ``w_{t,t'}`` (relative ones in ``local`` mode).

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): there is no query-key product.
The query enters only through the gate ``sigmoid(Q_t)``; the weighted average ``num_t / den_t`` of the values is a
function of the keys, values and biases (shared by all heads) alone. So it is computed once per key-value head, in
every mode and pattern, and each of the ``g`` query heads of the group gates it with its own ``sigmoid(Q)``
(:func:`_gate`). Decoding holds its sums, ring and cache per key-value head: state exactly ``1/g``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Attention
from .decoding import DecodeState, write_positions
from .registry import AttentionConfig, register_attention, require

# |w| below which exp(w) and exp(-w) are normal float32 numbers (float32's exp overflows past 88.7).
EXP_SAFE = 80.0
# Causal rows: largest gap (nats) between a channel's top key and the top key a row can see that
# float32 weights tolerate; beyond it the causal sums run in float64.
FP32_EXCESS = 60.0


@dataclass(frozen=True)
class AFTConfig(AttentionConfig):
    """``recompute`` (local mode): True = the output computed group by group of (batch, head) channels
    without keeping intermediates, each group recomputed in backward (AFT's channels are independent):
    memory of the (n, d)-sized intermediates one group at a time; False = the stored autograd path.
    Changes memory and time (one more forward), not results. Simple and full modes ignore it."""

    mode: Literal["simple", "local", "full"] = "local"
    window: int = 32
    bias_init_std: float = 0.02
    recompute: bool = True

    def validate(self) -> None:
        require(self.window >= 1, "window", f"must be >= 1 (biases live where |t - t'| < window), got {self.window}")
        require(self.bias_init_std >= 0.0, "bias_init_std", f"must be >= 0, got {self.bias_init_std}")
        if self.mode == "full":
            require(
                self.max_seq_len is not None,
                "max_seq_len",
                "mode='full' learns a (max_seq_len, max_seq_len) bias matrix and needs max_seq_len; "
                "got None (or use mode='local' / 'simple', which work at any length)",
            )


def aft_state_size(config: AFTConfig, seq_len: int) -> int:
    """What a query's output ``sigmoid(q_t) * num_t / den_t`` is computed from, per mode:

    - ``full``: every key and value with its own bias ``w_{t,t'}``: ``2 n d`` (causal: the last query, too).
    - ``simple``: one summary. Bidirectional, the normalised context ``softmax_t'(K) . V``: ``d``; causal,
      the prefix sums ``sum exp(K) V`` and ``sum exp(K)``: ``2 d``.
    - ``local``: the keys and values inside the window (their biases differ), ``2 d`` each, plus one ``2 d``
      summary of every key outside it (weight 1: prefix and suffix are added into one ``[num, den]`` sum):
      ``2 d min(n, 2 window)``; causal, the ``window`` keys ``t - window < t' <= t`` plus the prefix:
      ``2 d min(n, window + 1)``.
    """
    n, d, s = seq_len, config.head_dim, config.window
    if config.mode == "full":
        return 2 * n * d
    if config.mode == "simple":
        return 2 * d if config.causal else d
    return 2 * d * min(n, s + 1 if config.causal else 2 * s)


@register_attention(
    "aft",
    config=AFTConfig,
    family="attention-free",
    rotary="refused",
    rotary_note="AFT has no query-key product (sigmoid(Q_t) gates a per-channel softmax of K_t' + w_(t,t')): a "
                "rotation would only mix channel pairs by absolute position; its positions are its biases w",
    supports_causal=True,
    causal_note="the paper's causal AFT: sums over t' <= t in simple (cumulative), local and full modes",
    time_complexity="simple O(n d); local O(n s d); full O(n^2 d)",
    memory_complexity="simple O(n d); local O(n d); full O(n^2) for exp(w) (O(b n^2) masked), never n x n x d",
    needs_max_seq_len=False,
    applies_dropout=False,
    state_size_fn=aft_state_size,
    supports_decoding=True,
    decoding_note="by mode: simple, the running sums of exp(K) V and exp(K) (constant); local (default), a ring of "
                  "the window's keys/values plus those sums over the keys before it (bounded by the window); full, "
                  "a cache of every key and value (w_{t,t'} gives each a new weight per step: linear); the causal "
                  "sums themselves, per-channel running-max stabilised",
    state_growth="window",
    state_growth_fn=lambda config: {"simple": "constant", "local": "window", "full": "linear"}[config.mode],
    grouped_kv="shared",
    grouped_kv_note="no query-key product: the average sum exp(K + w) V / sum exp(K + w) is per key-value head in "
                    "every mode (decoding: its sums, ring or cache), each query head gating it with sigmoid(Q)",
)
class AFTAttention(Attention):
    """Attention Free Transformer: per-channel softmax over keys plus learned position biases."""

    def __init__(self, config: AFTConfig) -> None:
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed)
        if config.mode == "local":
            init = torch.randn(2 * config.window - 1, generator=gen) * config.bias_init_std
            self.rel_bias = nn.Parameter(init)
        elif config.mode == "full":
            n = config.max_seq_len
            self.pos_bias = nn.Parameter(torch.randn(n, n, generator=gen) * config.bias_init_std)

    def attend(self, q, k, v, key_padding_mask):
        if self.config.recompute and self.config.mode == "local":
            local = functools.partial(_local_attend, window=self.config.window, causal=self.config.causal)
            return grouped_recompute(local, q, k, v, key_padding_mask, (self.rel_bias,))
        if self.config.causal:
            return self._causal_attend(q, k, v, key_padding_mask)
        mode = self.config.mode
        if mode == "simple":
            return _gate(q, _simple_context(k, v, key_padding_mask))
        if mode == "full":
            num, den = self._full_sums(k, v, key_padding_mask)
        else:
            num, den = _local_sums(*_stable_key_weights(k, v, key_padding_mask), self.rel_bias, self.config.window)
        # den >= the top key's weight > 0 for any sequence with a real token; the clamp only
        # keeps all-padding sequences finite (their rows are padding anyway).
        return _gate(q, num / den.clamp_min(torch.finfo(den.dtype).tiny))

    def _causal_attend(self, q, k, v, key_padding_mask):
        """Sums over ``t' <= t`` only (see the module docstring); the same three modes."""
        weights, weighted_v = _causal_key_weights(k, v, key_padding_mask)
        mode = self.config.mode
        if mode == "simple":
            num, den = weighted_v.cumsum(dim=2), weights.cumsum(dim=2)
        elif mode == "local":
            num, den = _local_sums(weights, weighted_v, self.rel_bias, self.config.window, causal=True)
        else:
            exp_w = _causal_exp_bias(self.pos_bias[: k.shape[2], : k.shape[2]].to(weights.dtype), key_padding_mask)
            sums = torch.matmul(exp_w, torch.cat([weighted_v, weights], dim=-1))
            num, den = sums.split(k.shape[-1], dim=-1)
        # den > 0 on every real row (its own key); the clamp keeps rows without a real key finite.
        out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return _gate(q, out.to(q.dtype))

    # ------------------------------------------------------------------------------------------- decoding
    # Why a step equals the causal forward: the causal output is sigmoid(q_t) * num_t / den_t with num_t, den_t the
    # sums over t' <= t of exp(K_t' + w_{t,t'}) [V_t', 1], per channel. simple (w = 0): the sums are a recurrence;
    # the state is the sums so far, relative to a per-channel running maximum of K (rescaled when a key raises it,
    # so every weight is <= 1 and a row's top key weighs exactly 1: no float64 fallback needed). local: w_{t,t'} =
    # rel_bias[t' - t + s - 1] for t - s < t' <= t and 0 before, so the state is a ring of the s most recent keys and
    # values (each gets its own bias at each step) plus the same running sums over the keys that left the window
    # (weight 1 forever after). full: w_{t,t'} is a learned entry of row t, new at every step for every t', so no
    # summary of the past suffices: the state is every key and value, and a step is row t of the causal sums. The
    # forward's stabilising shifts (global key maximum, bias centre) cancel in num / den, as ours do.

    def new_state(self, batch, max_len, dtype, device):
        cfg, sums = self.config, torch.promote_types(dtype, torch.float32)
        heads = cfg.kv_heads  # one cache, ring and sums per key-value head (grouped_kv='shared')
        if cfg.mode == "full":
            return AFTCacheState(batch, max_len, heads, max_len, cfg.head_dim, dtype, device)
        if cfg.mode == "local":
            state = AFTCacheState(batch, max_len, heads, cfg.window, cfg.head_dim, dtype, device)
        else:
            state = AFTCacheState(batch, max_len, heads, 0, cfg.head_dim, dtype, device)
        state.num, state.den, state.reference = _empty_sums(batch, heads, cfg.head_dim, sums, device)
        return state

    def prefill_state(self, q, k, v, key_padding_mask, state):
        n, mode = q.shape[2], self.config.mode
        lengths = key_padding_mask.sum(1) if key_padding_mask is not None else torch.full_like(state.lengths, n)
        positions = torch.arange(n, device=q.device)[None, :]
        if mode == "full":
            state.k[:, :, :n], state.v[:, :, :n] = k, v
        elif mode == "local":
            s = self.config.window
            _fill_ring(state, k, v, lengths, s)
            older = positions < (lengths[:, None] - s)  # the keys that have left the window
            state.num, state.den, state.reference = _prompt_sums(k, v, older, state.num.dtype)
        else:
            state.num, state.den, state.reference = _prompt_sums(k, v, positions < lengths[:, None], state.num.dtype)
        return self.attend(q, k, v, key_padding_mask) if n else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        mode, pos = self.config.mode, state.lengths
        if mode == "simple":
            state.reference = _fold(state, k, v, None)
            num, den = state.num, state.den
        elif mode == "local":
            num, den = self._local_step(k, v, state)
        else:
            write_positions((state.k, state.v), (k, v), pos)
            num, den = _full_step(state, pos, self.pos_bias)
        out = num / den.clamp_min(torch.finfo(den.dtype).tiny)  # den >= 1: the row's top weight is exp(0)
        return _gate(q, out.to(q.dtype))

    def _local_step(self, k, v, state):
        """One token through the ring of the ``s`` latest keys and the sums of the keys before them."""
        s, pos = self.config.window, state.lengths
        rows = torch.arange(pos.shape[0], device=pos.device)
        slot = pos % s  # the new token's slot, holding position pos - s: it leaves the window now
        leaving = (state.k[rows, :, slot][:, :, None], state.v[rows, :, slot][:, :, None])
        state.reference = _fold(state, *leaving, pos >= s)
        write_positions((state.k, state.v), (k, v), slot)
        back = (pos[:, None] - torch.arange(s, device=pos.device)[None, :]) % s  # slot j holds position pos - back
        bias = self.rel_bias.to(state.num.dtype)[s - 1 - back]  # offset -back: rel_bias[-back + s - 1], (b, s)
        logits = state.k.to(state.num.dtype) + bias[:, None, :, None]
        logits = logits.masked_fill((back > pos[:, None])[:, None, :, None], float("-inf"))  # not yet written
        top = torch.maximum(logits.amax(dim=2, keepdim=True), state.reference)
        weights = (logits - top).exp_()
        older = _rescale(state.reference, top)  # the keys before the window, weight exp(K - top)
        num = (weights * state.v.to(weights.dtype)).sum(2, keepdim=True) + state.num * older
        den = weights.sum(2, keepdim=True) + state.den * older
        return num, den

    def _full_sums(self, k, v, key_padding_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(w) @ (exp(K) * V) and exp(w) @ exp(K), each exp shifted by its own maximum."""
        batch, heads, seq, dim = k.shape
        weights, weighted_v = _stable_key_weights(k, v, key_padding_mask)
        w = self.pos_bias[:seq, :seq].to(k.dtype)
        if key_padding_mask is None:
            w_max = w.detach().amax(dim=-1, keepdim=True)
            # In-place exp: one (seq, seq) buffer instead of two (autograd keeps exp's output, not its input).
            exp_w = (w - w_max).exp_()  # (seq, seq), shared by batch, heads and channels
        else:
            # Row maxima over real keys only: a large bias on a padded key must not
            # underflow the real ones. Costs a (batch, seq, seq) matrix in this mode.
            masked = w.detach().masked_fill(~key_padding_mask[:, None, :], float("-inf"))
            w_max = masked.amax(dim=-1, keepdim=True)
            w_max = torch.where(torch.isfinite(w_max), w_max, torch.zeros_like(w_max))
            exp_w = (w - w_max).exp_()[:, None]  # (batch, 1, seq, seq)
        # One matmul for numerator and denominator: [e * v, e] share the left factor.
        stacked = torch.cat([weighted_v, weights], dim=-1)
        sums = torch.matmul(exp_w, stacked)
        return sums[..., :dim], sums[..., dim:]


class AFTCacheState(DecodeState):
    """AFT's decoding state: ``k``, ``v`` ``(batch, heads, slots, d)`` in the input dtype (``full``: every position,
    ``slots = max_len``; ``local``: a ring of ``window`` slots, position ``p`` in slot ``p % window``; ``simple``: no
    slot) and, for ``simple`` and ``local``, the sums ``num``, ``den`` ``(batch, heads, 1, d)`` of ``exp(K - reference)
    [V, 1]`` over the keys summed so far (simple: all; local: those before the window), with ``reference`` their
    per-channel running maximum (``-inf`` before the first), float32 or wider."""

    positional = ("k", "v")

    def __init__(self, batch: int, max_len: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(batch, max_len, device)
        self.k, self.v = (torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device) for _ in range(2))
        self.num = self.den = self.reference = None


def _empty_sums(batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device):
    zeros = [torch.zeros(batch, heads, 1, dim, dtype=dtype, device=device) for _ in range(2)]
    return zeros[0], zeros[1], torch.full((batch, heads, 1, dim), float("-inf"), dtype=dtype, device=device)


def _rescale(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``exp(old - new)``, 0 where ``old`` is ``-inf`` (nothing summed against it)."""
    return torch.where(torch.isfinite(old), (old - new).exp(), torch.zeros_like(new))


def _prompt_sums(k: torch.Tensor, v: torch.Tensor, include: torch.Tensor, dtype: torch.dtype):
    """``(num, den, reference)`` over the prompt keys where ``include`` ``(b, n)`` is True (see AFTCacheState)."""
    k = k.to(dtype).masked_fill(~include[:, None, :, None], float("-inf"))
    b, h, n, d = k.shape
    reference = k.amax(dim=2, keepdim=True) if n else k.new_full((b, h, 1, d), float("-inf"))
    weights = (k - torch.where(torch.isfinite(reference), reference, torch.zeros_like(reference))).exp_()
    return (weights * v.to(dtype)).sum(2, keepdim=True), weights.sum(2, keepdim=True), reference


def _fold(state: AFTCacheState, k: torch.Tensor, v: torch.Tensor, take: torch.Tensor | None) -> torch.Tensor:
    """Add ``exp(K) [V, 1]`` of one key per sequence ``(b, h, 1, d)`` to the state's sums in place, where ``take``
    ``(b,)`` says so (None: all); returns the new reference (raised to the key where it is larger)."""
    k, v = k.to(state.num.dtype), v.to(state.num.dtype)
    grown = torch.maximum(state.reference, k)
    if take is not None:
        grown = torch.where(take[:, None, None, None], grown, state.reference)
    weight = (k - grown).exp_()
    if take is not None:
        weight = torch.where(take[:, None, None, None], weight, torch.zeros_like(weight))
    scale = _rescale(state.reference, grown)
    state.num.mul_(scale).add_(weight * v)
    state.den.mul_(scale).add_(weight)
    return grown


def _fill_ring(state: AFTCacheState, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, s: int) -> None:
    """Write each sequence's last ``min(length, s)`` prompt tokens into the ring: position ``p`` to slot ``p % s``."""
    if k.shape[2] == 0:
        return
    slots = torch.arange(s, device=k.device)[None, :]
    pos = lengths[:, None] - 1 - (lengths[:, None] - 1 - slots) % s  # the latest position p < length in each slot
    valid = (pos >= 0)[:, None, :, None]
    index = pos.clamp_min(0)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    for buf, t in ((state.k, k), (state.v, v)):
        buf.copy_(torch.where(valid, t.gather(2, index), torch.zeros_like(buf, dtype=t.dtype)))


def _full_step(state: AFTCacheState, pos: torch.Tensor, pos_bias: torch.Tensor):
    """Row ``pos[b]`` of the causal full-mode sums over the cached keys ``t' <= pos[b]``: ``(num, den)``."""
    n = int(pos.max()) + 1
    dtype = torch.promote_types(state.k.dtype, torch.float32)
    w = pos_bias.to(dtype)[pos, :n]  # (b, n): row t of the biases
    logits = state.k[:, :, :n].to(dtype) + w[:, None, :, None]
    later = torch.arange(n, device=pos.device)[None, :] > pos[:, None]
    logits = logits.masked_fill(later[:, None, :, None], float("-inf"))
    weights = (logits - logits.amax(dim=2, keepdim=True)).exp_()
    return (weights * state.v[:, :, :n].to(dtype)).sum(2, keepdim=True), weights.sum(2, keepdim=True)


def _local_sums(
    weights: torch.Tensor, weighted_v: torch.Tensor, rel_bias: torch.Tensor, s: int, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-window sums with weights exp(w) plus out-of-window sums with weight 1, both of e_t' [v_t', 1].

    The two parts are computed separately and added, never as the simple sums plus an
    ``(exp(w) - 1)`` correction: with biases far below 0 that correction nearly cancels the
    simple sum and float32 returned the difference of two almost equal numbers (issue 11).
    Out of the window, ``t' <= t - s`` and ``t' >= t + s`` are a prefix and a suffix sum
    (each a cumulative sum, of non-negative weights in the denominator). A common factor
    ``exp(-center)`` (``center`` the midpoint of the biases and 0) keeps ``exp(w)`` and the
    out-of-window weight inside float32 range when a bias exceeds +-EXP_SAFE; it cancels in num / den.
    """
    batch, heads, seq, dim = weights.shape
    # Numerator and denominator in one pass, channels first so that the sequence is the
    # contiguous axis: the banded Toeplitz product is then a few plain GEMMs.
    stacked = torch.cat([weighted_v.transpose(-1, -2), weights.transpose(-1, -2)], dim=-2)  # (b, h, 2d, n)
    bias = rel_bias.to(stacked.dtype)
    with torch.no_grad():
        # Shift only when exp would leave float32's range: w - center rounds, w itself does not.
        low, high = torch.clamp_max(bias.min(), 0.0), torch.clamp_min(bias.max(), 0.0)
        center = torch.where((high > EXP_SAFE) | (low < -EXP_SAFE), (low + high) / 2, torch.zeros_like(low))
    coeff = torch.exp(bias - center)  # coeff[o + s - 1]: key offset t' - t = o, in the window
    if causal:  # later keys (o > 0) get no weight, and no suffix sum below
        coeff = coeff * (torch.arange(2 * s - 1, device=coeff.device) <= s - 1)
    inside = _banded_sum(stacked, coeff, s)
    outside = stacked.new_zeros(())
    if seq > s:
        outside = F.pad(stacked[..., : seq - s].cumsum(-1), (s, 0))  # t' <= t - s
    if seq > s and not causal:
        outside = outside + F.pad(stacked[..., s:].flip(-1).cumsum(-1).flip(-1), (0, s))  # t' >= t + s
    totals = (inside + outside * torch.exp(-center)).transpose(-1, -2)  # (b, h, n, 2d), a view
    num, den = totals.split(dim, dim=-1)  # split (not slicing): its backward is one cat, no zero fill
    return num, den


def _local_attend(q, k, v, key_padding_mask, rel_bias, window: int, causal: bool) -> torch.Tensor:
    """Local-mode AFT of ``(b, h, n, d)`` inputs with biases ``rel_bias``: the stored path, as ``attend`` runs it."""
    if causal:
        weights, weighted_v = _causal_key_weights(k, v, key_padding_mask)
    else:
        weights, weighted_v = _stable_key_weights(k, v, key_padding_mask)
    num, den = _local_sums(weights, weighted_v, rel_bias, window, causal=causal)
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return _gate(q, out.to(q.dtype))


def _gate(q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``sigmoid(q) * context``: q ``(b, h, n, d)``, the key-value average ``(b, h_kv, n | 1, d)``, ``h_kv`` dividing
    ``h``; key-value head ``j``'s average is gated by each of its query heads ``j g .. j g + g - 1`` (grouped-query
    attention: read in place, never repeated)."""
    b, h, n, d = q.shape
    kv = context.shape[1]
    if kv == h:
        return torch.sigmoid(q) * context
    gated = torch.sigmoid(q).view(b, kv, h // kv, n, d) * context[:, :, None]  # splitting a dim: always a view
    return gated.reshape(b, h, n, d)


# Smallest group (elements of one (n, channels) intermediate: 1 MiB in float32), and the most groups: a group
# of T / 8 of the T input elements keeps its intermediates near T while the floor (q, k, v's gradients and the
# output) is 4 T. Inputs of at most one smallest group (short training batches) run the stored path: there is
# no memory to save, and a recomputed forward would only cost time.
GROUP_ELEMENTS = 1 << 18
MAX_GROUPS = 8


def grouped_recompute(fn, q, k, v, key_padding_mask, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``fn(q, k, v, key_padding_mask, *params)`` for a mechanism whose (batch, head) channels are independent,
    computed group by group (batch rows, or heads of one row) without storing intermediates; each group is
    recomputed in backward (its output, then autograd's gradients of that group only). Keeps ``q, k, v`` and
    the ``params``; the gradients are those of ``fn`` itself. Shapes ``(b, h, n, d)``, output ``q``'s shape.
    Grouped-query attention: k, v may have ``h_kv`` heads dividing ``h``; a group of key-value heads ``h0:h1`` then
    goes with their query heads ``h0 g : h1 g`` (``g = h / h_kv``), so ``fn`` sees each key-value head whole."""
    b, h, n, d = k.shape  # split along the key-value heads, each with its query heads
    g = q.shape[1] // h
    total = q.numel()
    per = max(GROUP_ELEMENTS, -(-total // MAX_GROUPS))
    if per >= total:
        return fn(q, k, v, key_padding_mask, *params)
    if per >= g * h * n * d:
        rows = per // (g * h * n * d)
        groups = [(i, min(i + rows, b), 0, h) for i in range(0, b, rows)]
    else:
        heads = max(1, per // (g * n * d))
        groups = [(i, i + 1, h0, min(h0 + heads, h)) for i in range(b) for h0 in range(0, h, heads)]
    return _GroupRecompute.apply(fn, groups, g, key_padding_mask, q, k, v, *params)


def _channel_slices(q, k, v, i: int, j: int, h0: int, h1: int, g: int) -> tuple[torch.Tensor, ...]:
    """Batch rows ``i:j``, key-value heads ``h0:h1`` of k, v and their query heads ``h0 g : h1 g`` of q."""
    return q[i:j, h0 * g:h1 * g], k[i:j, h0:h1], v[i:j, h0:h1]


class _GroupRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, groups, g, mask, q, k, v, *params):
        out = torch.empty_like(q)
        with torch.no_grad():
            for i, j, h0, h1 in groups:
                part = _channel_slices(q, k, v, i, j, h0, h1, g)
                out[i:j, h0 * g:h1 * g] = fn(*part, None if mask is None else mask[i:j], *params)
        ctx.fn, ctx.groups, ctx.g, ctx.mask = fn, groups, g, mask
        ctx.save_for_backward(q, k, v, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *params = ctx.saved_tensors
        g = ctx.g
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        param_grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        for i, j, h0, h1 in ctx.groups:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in _channel_slices(q, k, v, i, j, h0, h1, g)]
                plain = [p.detach().requires_grad_(p.requires_grad) for p in params]
                out = ctx.fn(*leaves, None if ctx.mask is None else ctx.mask[i:j], *plain)
                wanted = leaves + [p for p in plain if p.requires_grad]
                found = torch.autograd.grad(out, wanted, grad_out[i:j, h0 * g:h1 * g], allow_unused=True)
            spans = ((h0 * g, h1 * g), (h0, h1), (h0, h1))  # q's heads, then k's and v's
            for grad, part, (lo, hi) in zip(grads, found[:3], spans):
                if part is not None:
                    grad[i:j, lo:hi] = part
            extra = iter(found[3:])
            for j, p in enumerate(plain):
                if p.requires_grad:
                    part = next(extra)
                    if part is not None:
                        param_grads[j] += part
        return (None, None, None, None, *grads, *param_grads)


def _banded_sum(stacked: torch.Tensor, coeff: torch.Tensor, s: int) -> torch.Tensor:
    """``out[..., t] = sum_{|t' - t| < s} coeff[t' - t + s - 1] stacked[..., t']`` for ``stacked`` (..., n).

    A banded Toeplitz product done as block GEMMs over the sequence: blocks of max(32, 2s) (capped
    at n) positions, each with its own block and the s - 1 edge positions of its neighbours.
    """
    seq = stacked.shape[-1]
    b = min(max(32, 2 * s), seq)  # block length; > s - 1 whenever there are several blocks
    blocks = -(-seq // b)
    padded = stacked if blocks * b == seq else F.pad(stacked, (0, blocks * b - seq))
    rows = padded.reshape(-1, blocks, b)
    # Within a block: query i, key j, offset j - i.
    out = torch.matmul(rows, _toeplitz(coeff, b, b, row_start=0, col_start=0, window=s).T)
    if blocks > 1 and s > 1:
        edge = s - 1
        # The first s - 1 queries of a block see the last s - 1 keys of the previous block,
        # the last s - 1 queries see the first s - 1 keys of the next one.
        prev = _toeplitz(coeff, edge, edge, row_start=b, col_start=b - edge, window=s)
        nxt = _toeplitz(coeff, edge, edge, row_start=b - edge, col_start=b, window=s)
        out[:, 1:, :edge] += torch.matmul(rows[:, :-1, b - edge:], prev.T)
        out[:, :-1, b - edge:] += torch.matmul(rows[:, 1:, :edge], nxt.T)
    out = out.view(*stacked.shape[:-1], blocks * b)
    return out if blocks * b == seq else out[..., :seq]


def _toeplitz(coeff: torch.Tensor, n_rows: int, n_cols: int, row_start: int, col_start: int, window: int):
    """(n_rows, n_cols) slice of the banded matrix M[t, t'] = coeff[t' - t + window - 1] for |t' - t| < window."""
    t = torch.arange(row_start, row_start + n_rows, device=coeff.device)[:, None]
    t2 = torch.arange(col_start, col_start + n_cols, device=coeff.device)[None, :]
    offset = t2 - t
    inside = offset.abs() < window
    return torch.where(inside, coeff[(offset + window - 1).clamp(0, 2 * window - 2)], coeff.new_zeros(()))


def _simple_context(k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """sum_t' softmax_t'(K)_t' V_t' per channel: (batch, heads, 1, dim). softmax subtracts the maximum."""
    if key_padding_mask is not None:
        k = k.masked_fill(~key_padding_mask[:, None, :, None], float("-inf"))
    probs = torch.softmax(k, dim=2)
    if key_padding_mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # all-padding sequence: no key at all
    return (probs * v).sum(dim=2, keepdim=True)


def _causal_key_weights(
    k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_stable_key_weights` for causal sums, in float64 where float32 would underflow a row.

    The shift is the maximum over all real keys, later ones included: it cancels (and is detached,
    so no gradient reaches a later key), but row ``t`` only sums keys ``t' <= t``, whose largest
    weight is ``exp(max_{t'<=t} K - max K)``. When a later key exceeds every earlier one of a channel
    by more than ``FP32_EXCESS`` nats, float32 would lose that row; the weights are then float64.
    """
    with torch.no_grad():
        kd = k.detach() if key_padding_mask is None else k.detach().masked_fill(
            ~key_padding_mask[:, None, :, None], float("-inf"))
        excess = kd.amax(dim=2, keepdim=True) - kd.cummax(dim=2).values
        wide = bool(excess.nan_to_num(nan=0.0, posinf=0.0).amax() > FP32_EXCESS) if excess.numel() else False
    if wide:
        k, v = k.double(), v.double()
    return _stable_key_weights(k, v, key_padding_mask)


def _causal_exp_bias(w: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``exp(w - row max)`` on ``t' <= t`` (real keys only), 0 elsewhere: ``(seq, seq)`` or ``(batch, 1, seq, seq)``."""
    allowed = torch.ones_like(w, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    # Mask before exp (exp(-inf) = 0): a later bias never overflows, and its gradient is exactly 0.
    masked = w.masked_fill(~allowed, float("-inf"))
    w_max = masked.detach().amax(dim=-1, keepdim=True)
    w_max = torch.where(torch.isfinite(w_max), w_max, torch.zeros_like(w_max))
    exp_w = (masked - w_max).exp()
    return exp_w if key_padding_mask is None else exp_w[:, None]


def _stable_key_weights(
    k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(K - max over real keys) per channel (0 at padded keys) and its product with V."""
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, :, None]
        k = k.masked_fill(~real, float("-inf"))
    k_max = k.detach().amax(dim=2, keepdim=True)  # the shift cancels in num / den: no gradient needed
    k_max = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max))  # all-padding sequence
    weights = torch.exp(k - k_max)
    return weights, weights * v
