"""Longformer attention (Beltagy et al. 2020): a sliding band plus a few global tokens.

Query ``i`` attends to keys ``j`` with ``|i - j| <= window // 2`` (the band of ``sliding_window``)
and to every global position; a global position attends to every key. Each row is one joint
softmax, and a key that is both in the band and global is counted once. Exact for this pattern.

Computed as the blocked band of ``sliding_window`` with the global keys appended to every
block's keys (masked where the band already holds them), and the few global query rows as
dense rows over all keys: time ``O(n (w + g) d)`` for ``g`` globals, memory ``O(n d)`` (``recompute=True``,
chunks rebuilt in backward) or ``O(n (w + g))`` (``recompute=False``).
The same projections serve local and global attention (the paper's separate global
projections belong to the backbone, which owns the projections).

Causal (``causal=True``): the left part of each piece of the pattern. The paper's autoregressive
character-LM uses dilated causal windows and no global tokens; we keep the pattern and cut what lies
ahead, so the causal cell measures the same mechanism: query ``i`` sees ``i - window // 2 .. i`` and the
global positions before that, a global position ``p`` sees every key ``j <= p``. Still blocked, left
neighbour blocks only; the global rows are a dense ``(g, n)`` block with a ``j <= p`` mask.

Decoding (issue 24; :mod:`attentions._kv_slots`), derived from that causal form. The global positions are fixed by
the config, so a global query can come at any later step up to the last global position below ``max_len``,
``P``, and it reads every key before it. The state is therefore (:class:`LongformerState`):

- the band's ring of ``window // 2 + 1`` slots, as in ``sliding_window`` (position ``p`` in slot ``p % slots``);
- a prefix cache of the positions ``0 .. P`` (slot = position; empty without global positions below ``max_len``):
  the whole past while a global position still lies ahead, and the global keys for every later query.

A step at a non-global position ``p`` reads the ring's filled slots (``p - window // 2 .. p``) and the global keys
``g < p - window // 2`` from the prefix cache (those in the band are read once, from the ring); a step at a global
position ``p`` reads the prefix cache's slots ``0 .. p``. Why it is exact: these are exactly the keys of causal row
``p`` in :func:`longformer_parts` (band part: band plus the globals left of it; global rows: every ``j <= p``),
each once, in one joint softmax. So the state is bounded by ``window // 2 + 1 + P + 1`` slots, not by the context
(``state_growth="window"``): with the default ``global_positions=(0,)`` it is the ring plus one slot; a config
with a global position far ahead holds the whole past up to it.

Grouped-query attention (``num_kv_heads``; ``grouped_kv="shared"``): band and global positions are the same for every
head, so the blocked executor folds the query heads of a group into the rows of one block (band and global rows)
against the group's keys (:mod:`attentions._blocked`: no repeated k, v); the ring and the prefix cache hold
``num_kv_heads`` heads, each read by its group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _blocked as blk
from ._kv_slots import KVSlots, attend_slots, check_slots, filled, write_slots
from .base import Attention
from .registry import AttentionConfig, register_attention, require
from .sliding_window import band_part, band_pattern, fill_ring, ring_slots, validate_window


@dataclass(frozen=True)
class LongformerConfig(AttentionConfig):
    """``window``: band width as in ``sliding_window``; ``global_positions``: token positions that are global.

    The default global token is position 0, the CLS token under CLS pooling. Positions at or
    beyond the current sequence length are ignored (so appended padding changes nothing).
    ``recompute``: as in ``sliding_window`` (True: rebuild the blocked scores in backward, O(n d) memory;
    False: keep the blocked probabilities). Memory and time change, results do not.
    """

    window: int = 256
    global_positions: tuple[int, ...] = (0,)
    recompute: bool = True

    def validate(self) -> None:
        validate_window(self.window, self.max_seq_len)
        negative = [p for p in self.global_positions if p < 0]
        require(not negative, "global_positions", f"positions must be >= 0, got {negative}")
        duplicates = sorted({p for p in self.global_positions if self.global_positions.count(p) > 1})
        require(not duplicates, "global_positions", f"positions must be distinct, got duplicates {duplicates}")


def longformer_state_size(config: LongformerConfig, seq_len: int) -> int:
    """``2 d`` times the most keys a non-global query reads: its band (``|i - j| <= window // 2``; causal
    ``i - window // 2 <= j <= i``) plus the global positions outside it (causal: those before it).

    A global query reads every key (``2 n d``); that is the count only when every position is global.
    """
    n, half = seq_len, config.window // 2
    pos = torch.arange(n)
    glob = torch.tensor(sorted(p for p in config.global_positions if p < n), dtype=torch.long)
    lo = (pos - half).clamp(min=0)
    hi = pos if config.causal else (pos + half).clamp(max=n - 1)
    outside = glob[None, :] < lo[:, None]
    if not config.causal:
        outside = outside | (glob[None, :] > hi[:, None])
    keys = hi - lo + 1 + outside.sum(dim=1)
    local = ~torch.isin(pos, glob)
    most = int(keys[local].max()) if bool(local.any()) else n
    return 2 * config.head_dim * most


@register_attention(
    "longformer",
    config=LongformerConfig,
    family="sparse",
    rotary_note="exact RoPE on its pattern: each kept score, band or global, is q_i^T R_(j-i) k_j (RoFormer eq. 16); "
                "which keys a row keeps still depends on the absolute global positions",
    supports_causal=True,
    causal_note="left half of the band; a global token sees keys up to itself, every token the globals before it",
    time_complexity="O(n (w + g) d), g = global tokens",
    memory_complexity="O(n d); O(n (w + g)) with recompute=false",
    exact=True,
    state_size_fn=longformer_state_size,
    needs_max_seq_len=False,
    supports_decoding=True,
    decoding_note="band ring + cache of positions 0..last global (< max_len): a global step reads j <= p, others "
                  "the ring and earlier globals",
    state_growth="window",
    grouped_kv="shared",
    grouped_kv_note="training: a group's query heads folded into the rows of its band and global blocks (k, v not "
                    "repeated); decoding: ring and global prefix cache of num_kv_heads heads",
)
class LongformerAttention(Attention):
    """Longformer attention: sliding band plus global tokens that see and are seen by every token."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__(config)
        self._global = tuple(sorted(config.global_positions))

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        n = q.shape[2]
        glob = torch.tensor([p for p in self._global if p < n], dtype=torch.long, device=q.device)
        run = blk.attend_recompute if cfg.recompute else blk.attend_stored
        return run(q, k, v, longformer_parts(n, cfg.window // 2, glob, cfg.causal), key_padding_mask,
                   cfg.dropout if self.training else 0.0)

    # Decoding: the band's ring plus the prefix cache up to the last global position (module docstring).
    # Inference only: no dropout in the step.

    def _layout(self, max_len: int) -> dict[str, int]:
        glob = [p for p in self._global if p < max_len]
        return {"slots": ring_slots(self.config.window, max_len), "prefix_slots": glob[-1] + 1 if glob else 0}

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> LongformerState:
        lay = self._layout(max_len)
        return LongformerState(batch, max_len, lay["slots"], lay["prefix_slots"], self.config.kv_heads,
                               self.config.head_dim, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state) -> torch.Tensor:
        check_slots(self.name, state, LongformerState, **self._layout(state.max_len))
        fill_ring(state, k, v, key_padding_mask)
        m = min(k.shape[2], state.prefix_slots)
        state.pk[:, :, :m], state.pv[:, :, :m] = k[:, :, :m], v[:, :, :m]  # padded slots are zero; steps overwrite
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state) -> torch.Tensor:
        check_slots(self.name, state, LongformerState, **self._layout(state.max_len))
        pos = state.lengths
        write_slots(state.k, state.v, k, v, pos)
        in_prefix = torch.nonzero(pos < state.prefix_slots).flatten()
        write_slots(state.pk, state.pv, k, v, pos, rows=in_prefix)
        glob = torch.tensor([p for p in self._global if p < state.prefix_slots], dtype=torch.long, device=pos.device)
        is_global = torch.isin(pos, glob)
        if not bool(is_global.any()):  # the usual step: no sequence at a global position
            return self._band_step(q, state, pos, glob, None)
        out = torch.empty_like(q)
        local = torch.nonzero(~is_global).flatten()
        if local.numel():
            out[local] = self._band_step(q[local], state, pos[local], glob, local)
        rows = torch.nonzero(is_global).flatten()
        # A global query: every key j <= p, all in the prefix cache (p <= the last global position).
        n = int(pos[rows].max()) + 1
        out[rows] = attend_slots(q[rows], state.pk[rows, :, :n], state.pv[rows, :, :n], filled(n, pos[rows]))
        return out

    def _band_step(self, q, state: LongformerState, pos, glob, rows) -> torch.Tensor:
        """Non-global queries at ``pos`` (of the sequences ``rows``, None: all): the ring's filled slots (the band)
        and the global keys left of the band, from the prefix cache."""
        ring_k, ring_v, pk, pv = (t if rows is None else t[rows] for t in (state.k, state.v, state.pk, state.pv))
        keys = torch.cat([ring_k, pk.index_select(2, glob)], dim=2)
        values = torch.cat([ring_v, pv.index_select(2, glob)], dim=2)
        allowed = torch.cat([filled(ring_k.shape[2], pos), glob[None, :] < (pos - self.config.window // 2)[:, None]],
                            dim=1)
        return attend_slots(q, keys, values, None if bool(allowed.all()) else allowed)


class LongformerState(KVSlots):
    """The band's ring ``k``/``v`` ``(batch, heads, slots, d)`` (position ``p`` in slot ``p % slots``) and the prefix
    cache ``pk``/``pv`` ``(batch, heads, prefix_slots, d)`` of the positions ``0 .. last global`` (slot = position);
    ``heads``: the key-value heads."""

    positional = ("k", "v", "pk", "pv")

    def __init__(self, batch: int, max_len: int, slots: int, prefix_slots: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(batch, max_len, slots, heads, head_dim, dtype, device)
        self.pk, self.pv = (torch.zeros(batch, heads, prefix_slots, head_dim, dtype=dtype, device=device)
                            for _ in range(2))

    @property
    def prefix_slots(self) -> int:
        return int(self.pk.shape[2])


def longformer_parts(n: int, half: int, glob: torch.Tensor, causal: bool) -> list[blk.Part]:
    """The blocked band with the global keys appended to every query block's keys, then the global rows.

    ``glob``: the global positions below ``n`` (sorted long tensor). In the band part a global key column
    counts only where the band does not already hold that key (each key once per row; causal: only the
    globals before the band's left edge), and global query rows are empty: the second part, the global
    rows over every key (causal: every key up to itself), owns them.
    """
    band = band_part(n, half, causal)
    if glob.numel() == 0:
        return [band]
    in_band = band_pattern(half, causal)
    band_slots = (band.band[0] + band.band[1] + 1) * band.block

    def pattern(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        ahead = query_pos - key_pos[:, :, band_slots:]
        outside = ahead > half if causal else ahead.abs() > half
        allowed = torch.cat([in_band(query_pos, key_pos[:, :, :band_slots]), outside], dim=-1)
        return allowed & ~torch.isin(query_pos, glob.to(query_pos.dtype))

    blocks = blk.num_blocks(n, band.block)
    local = dataclasses.replace(band, gathered=glob[None, :].expand(blocks, -1), pattern=pattern)
    rows = blk.Part(glob, None, prefix=n, pattern=blk.causal_pattern if causal else None)
    return [local, rows]

