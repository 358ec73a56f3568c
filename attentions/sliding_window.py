"""Sliding-window (local) attention: query ``i`` attends to keys ``j`` with ``|i - j| <= window // 2``.

Exact for its band pattern. Computed in blocks: queries are cut into blocks of ``c`` tokens and
each block sees its ``2m+1`` neighbouring key blocks (``m = ceil((window // 2) / c)``), with the
band enforced by a mask inside the blocks; time ``O(n w d)``. Memory ``O(n d)`` (``recompute=True``, the
default: the blocks are computed in chunks and rebuilt in backward, ``attentions._blocked``), or ``O(n w)``
with ``recompute=False`` (the blocked probabilities kept for backward).

Causal (``causal=True``): the left half of the band, ``i - window // 2 <= j <= i`` (the local attention
of causal language models, as in local-attention's ``causal=True``: the window keeps its half-width
and loses the future side, so ``window // 2 + 1`` keys per row). Only the left neighbour blocks and
the own block are gathered (no right blocks), so the causal band costs about half the bidirectional one.

Decoding (issue 24; :mod:`attentions._kv_slots`): a ring buffer of ``window // 2 + 1`` key-value slots (fewer when
``max_len`` is smaller), position ``p`` in slot ``p % slots``, per-sequence lengths. The prefill runs the causal
forward and keeps each sequence's last ``slots`` real keys and values; a step writes the new token over the oldest
slot and attends to the filled slots with SDPA. Why it is exact: causal row ``p`` reads the keys
``p - window // 2 .. p`` (:func:`band_pattern`, ``0 <= p - j <= window // 2``), at most ``window // 2 + 1`` of
them, and after the write the ring holds exactly those: the ``min(p + 1, slots)`` latest positions, each in its
own slot (``p % slots``). The joint softmax over them is the causal row, up to float rounding.

Grouped-query attention (``num_kv_heads``; ``grouped_kv="shared"``): every head has the same band, so the blocked
executor folds the query heads of a group into the rows of one block against the group's key blocks
(:mod:`attentions._blocked`: no repeated k, v), and the ring holds ``num_kv_heads`` heads, each read by its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _blocked as blk
from ._kv_slots import KVSlots, attend_slots, check_slots, fill_slots, filled, write_slots
from .base import Attention
from .registry import AttentionConfig, register_attention, require

# Query block length for the band. Blocks of half the window waste a third of the scores
# (3 blocks of w/2 for a band of w + 1 keys); capping the block at 64 tokens and using more
# neighbour blocks keeps the waste at <= 64 keys per row while the matmuls stay large.
BAND_BLOCK = 64


@dataclass(frozen=True)
class SlidingWindowConfig(AttentionConfig):
    """``window``: band width; query ``i`` sees keys ``i - window//2 .. i + window//2``.

    Any positive int is accepted; an even ``window`` covers ``window + 1`` keys (``window // 2`` on
    each side, as in Longformer), an odd one exactly ``window``.

    ``recompute``: True (default) keeps only q, k, v, the output and a log-sum-exp per row for backward
    and rebuilds the blocked scores there (``attentions._blocked.attend_recompute``); False keeps the
    blocked probabilities (``attend_stored``). Memory and time change, results do not.
    """

    window: int = 256
    recompute: bool = True

    def validate(self) -> None:
        validate_window(self.window, self.max_seq_len)


def validate_window(window: int, max_seq_len: int | None) -> None:
    """Shared by sliding_window and longformer."""
    require(window >= 1, "window", f"must be a positive int (band |i - j| <= window // 2), got {window}")
    if max_seq_len is not None:
        require(
            window <= 2 * max_seq_len,
            "window",
            f"must be <= 2 * max_seq_len = {2 * max_seq_len} (a wider band is full attention), got {window}",
        )


def band_block_size(half_window: int, n: int) -> int:
    """Query block length for a band of half-width ``half_window`` on ``n`` tokens (never beyond ``n``)."""
    per_side = max(1, -(-half_window // BAND_BLOCK))
    block = max(1, -(-half_window // per_side))
    return min(block, n)


def band_part(n: int, half_window: int, causal: bool = False) -> blk.Part:
    """The band as one blocked part over all ``n`` rows: query blocks of :func:`band_block_size`, each with
    its ``m`` neighbour key blocks on either side (``causal``: left only), masked to ``|i - j| <= half_window``
    (``causal``: ``i - half_window <= j <= i``)."""
    block = band_block_size(half_window, n)
    # Neighbours beyond the last block hold nothing: cap m so short inputs do not pay for a wide window.
    m = min(-(-half_window // block), blk.num_blocks(n, block) - 1)
    return blk.Part((0, n), block, band=(m, 0 if causal else m), pattern=band_pattern(half_window, causal))


def band_pattern(half_window: int, causal: bool):
    """``(query_pos, key_pos) -> allowed`` of the band (see :class:`attentions._blocked.Part`)."""

    def in_band(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        ahead = query_pos - key_pos
        return (ahead >= 0) & (ahead <= half_window) if causal else ahead.abs() <= half_window

    return in_band


def sliding_window_state_size(config: SlidingWindowConfig, seq_len: int) -> int:
    """The keys and values of the band: ``2 d min(n, 2 (window // 2) + 1)``; causal ``2 d min(n, window // 2 + 1)``."""
    half = config.window // 2
    keys = half + 1 if config.causal else 2 * half + 1
    return 2 * config.head_dim * min(seq_len, keys)


@register_attention(
    "sliding_window",
    config=SlidingWindowConfig,
    family="sparse",
    rotary_note="exact RoPE on its band: each kept score is q_i^T R_(j-i) k_j (RoFormer eq. 16); the band is itself "
                "relative",
    supports_causal=True,
    causal_note="left half of the band: i - window // 2 <= j <= i, left neighbour blocks only",
    time_complexity="O(n w d)",
    memory_complexity="O(n d); O(n w) with recompute=false",
    exact=True,
    state_size_fn=sliding_window_state_size,
    needs_max_seq_len=False,
    supports_decoding=True,
    decoding_note="ring of the window // 2 + 1 latest keys/values (slot p % size); a step reads the band j >= p - w//2",
    state_growth="window",
    grouped_kv="shared",
    grouped_kv_note="training: a group's query heads folded into the rows of its band blocks (k, v not repeated); "
                    "decoding: a ring of num_kv_heads heads",
)
class SlidingWindowAttention(Attention):
    """Sliding-window attention: each token attends to the keys within window // 2 positions of it."""

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        parts = [band_part(q.shape[2], cfg.window // 2, cfg.causal)]
        run = blk.attend_recompute if cfg.recompute else blk.attend_stored
        return run(q, k, v, parts, key_padding_mask, cfg.dropout if self.training else 0.0)

    # Decoding: the ring buffer of the causal band (module docstring). Inference only: no dropout in the step.

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVSlots:
        slots = ring_slots(self.config.window, max_len)
        return KVSlots(batch, max_len, slots, self.config.kv_heads, self.config.head_dim, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=ring_slots(self.config.window, state.max_len))
        fill_ring(state, k, v, key_padding_mask)
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=ring_slots(self.config.window, state.max_len))
        pos = state.lengths
        write_slots(state.k, state.v, k, v, pos)
        # Always the mask, never a test of it: no host sync in this hook (what a CUDA-graph-captured step needs).
        return attend_slots(q, state.k, state.v, filled(state.slots, pos))


def ring_slots(window: int, max_len: int) -> int:
    """Slots of the causal band's ring: the ``window // 2 + 1`` keys a causal row reads, at most ``max_len``."""
    return min(window // 2 + 1, max_len)


def fill_ring(state: KVSlots, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
    """Each sequence's last ``state.slots`` real prompt keys/values into the ring (prompt ``(batch, heads, n, d)``)."""
    n = k.shape[2]
    lengths = key_padding_mask.sum(dim=1) if key_padding_mask is not None else state.lengths.new_full(
        (k.shape[0],), n)
    fill_slots(state.k, state.v, k, v, lengths)
