"""Longformer attention (Beltagy et al. 2020): a sliding band plus a few global tokens.

Query ``i`` attends to keys ``j`` with ``|i - j| <= window // 2`` (the band of ``sliding_window``)
and to every global position; a global position attends to every key. Each row is one joint
softmax, and a key that is both in the band and global is counted once. Exact for this pattern.

Computed as the blocked band of ``sliding_window`` with the global keys appended to every
block's keys (masked where the band already holds them), and the few global query rows as
dense rows over all keys: time ``O(n (w + g) d)``, memory ``O(n (w + g))`` for ``g`` globals.
The same projections serve local and global attention (the paper's separate global
projections belong to the backbone, which owns the projections).

Causal (``causal=True``): the left part of each piece of the pattern. The paper's autoregressive
character-LM uses dilated causal windows and no global tokens; we keep the pattern and cut what lies
ahead, so the causal cell measures the same mechanism: query ``i`` sees ``i - window // 2 .. i`` and the
global positions before that, a global position ``p`` sees every key ``j <= p``. Still blocked, left
neighbour blocks only; the global rows are a dense ``(g, n)`` block with a ``j <= p`` mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _blocked as blk
from .base import Attention
from .registry import AttentionConfig, register_attention, require
from .sliding_window import band_setup, validate_window


@dataclass(frozen=True)
class LongformerConfig(AttentionConfig):
    """``window``: band width as in ``sliding_window``; ``global_positions``: token positions that are global.

    The default global token is position 0, the CLS token under CLS pooling. Positions at or
    beyond the current sequence length are ignored (so appended padding changes nothing).
    """

    window: int = 256
    global_positions: tuple[int, ...] = (0,)

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
    supports_causal=True,
    causal_note="left half of the band; a global token sees keys up to itself, every token the globals before it",
    time_complexity="O(n (w + g) d), g = global tokens",
    memory_complexity="O(n (w + g))",
    exact=True,
    state_size_fn=longformer_state_size,
    needs_max_seq_len=False,
)
class LongformerAttention(Attention):
    """Longformer attention: sliding band plus global tokens that see and are seen by every token."""

    def __init__(self, config: LongformerConfig) -> None:
        super().__init__(config)
        self._global = tuple(sorted(config.global_positions))

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        batch, heads, n, d = q.shape
        half = cfg.window // 2
        dropout = cfg.dropout if self.training else 0.0
        glob = torch.tensor([p for p in self._global if p < n], dtype=torch.long, device=q.device)

        block, m, right, band_pos, in_band = band_setup(n, half, q.device, cfg.causal)
        nb = band_pos.shape[0]
        query_pos = torch.arange(nb * block, device=q.device).view(nb, block)
        # Global key columns, skipped where the band already holds that key (counted once); causal: only
        # the globals before the band's left edge (those at or after i are in the band or in the future).
        ahead = query_pos[:, :, None] - glob[None, None, :]
        glob_new = ahead > half if cfg.causal else ahead.abs() > half
        key_pos = torch.cat([band_pos, glob[None, :].expand(nb, -1)], dim=1)
        pattern = torch.cat([in_band.expand(nb, -1, -1), glob_new], dim=2)
        allowed = pattern & blk.key_exists(key_pos, n, key_padding_mask)[:, :, None]

        qb = blk.to_blocks(q, block)
        kb = self._keys(blk.to_blocks(k, block), k, glob, m, right)
        vb = self._keys(blk.to_blocks(v, block), v, glob, m, right)
        out = blk.masked_attention(qb, kb, vb, allowed[:, None], dropout, self.training)
        out = out.reshape(batch, heads, -1, d)[:, :, :n]
        if glob.numel() == 0:
            return out

        # Global query rows attend to every (real) key: a dense (g, n) block; causal: every key up to itself.
        row_allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        if cfg.causal:
            past = torch.arange(n, device=q.device)[None, :] <= glob[:, None]  # (g, n)
            row_allowed = past if row_allowed is None else row_allowed & past
        out_glob = blk.masked_attention(q[:, :, glob], k, v, row_allowed, dropout, self.training)
        return out.index_copy(2, glob, out_glob)

    @staticmethod
    def _keys(xb: torch.Tensor, x: torch.Tensor, glob: torch.Tensor, m: int, right: int) -> torch.Tensor:
        """Band blocks of ``xb`` followed by the global rows of ``x``, per query block."""
        band = blk.band_blocks(xb, m, right)
        if glob.numel() == 0:
            return band
        batch, heads, nb, _, d = band.shape
        extra = x[:, :, glob][:, :, None].expand(batch, heads, nb, glob.numel(), d)
        return torch.cat([band, extra], dim=3)
