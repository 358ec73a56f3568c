"""BigBird block-sparse attention (Zaheer et al. 2020), ITC variant (global tokens are existing tokens).

The sequence is cut into blocks of ``block_size`` tokens. Block ``i``:

- attends to blocks ``i-1, i, i+1`` (sliding band of 3 blocks),
- attends to the first ``num_global_blocks`` blocks, which in turn attend to everything,
- attends to ``num_random_blocks`` random blocks.

One joint softmax per row; a key block that is both in the band and global is counted once.
Exact for this pattern: time ``O(n b (3 + g + r) d)``, memory ``O(n d)`` (``recompute=True``: chunks rebuilt in
backward) or ``O(n b (3 + g + r))`` (``recompute=False``).

The random blocks must be a fixed function of positions (or appending padding would change
the real rows), so they are drawn once from ``seed`` for the ``ceil(max_seq_len / block_size)``
blocks of the longest sequence and kept in the buffer ``random_blocks`` (``-1`` = unused slot).
Each row's random blocks are distinct and exclude its band and the global blocks; a row with
fewer than ``r`` such candidates gets them all and unused slots. On a shorter input, random
blocks beyond its last block hold no keys and are masked like padding, so short inputs can see
fewer than ``r`` random blocks per row.

Causal (``causal=True``): the paper's BigBird is an encoder (its decoder uses full causal attention),
so the causal form is ours: the left part of each piece. Block ``i`` attends to block ``i-1`` and to
its own block with ``j <= i`` inside, to the global blocks (all before it), and to ``r`` random blocks
drawn among the fully past blocks ``g .. i-2`` (a different draw from the bidirectional one, from the
same ``seed``); global rows attend to the keys up to themselves. Same blocked computation with one
band block fewer, still no ``n x n`` tensor.

Decoding (issue 24; :mod:`attentions._kv_slots`): a KV cache of the whole past, ``(batch, heads, max_len,
head_dim)``, slot = position, and a step that reads only the keys its causal row allows. The whole past, because
the random blocks of the rows still to come are drawn (from ``seed`` and ``max_seq_len``) among all the fully past
blocks ``g .. i-2``: a later row may reach any past block, so no block can be dropped. The step at position ``p``
(query block ``i = p // block_size``) gathers the global positions ``0 .. g b - 1``, the band blocks ``i-1, i`` and
the row's random blocks (``random_blocks[i]``, the buffer the forward uses), and keeps the keys ``j <= p``, the
band's global keys counted once (in the global segment): for ``i >= g`` exactly the keys of the local part of
:func:`bigbird_parts`, for a global row (``i < g``; no random blocks, its band inside the global blocks) exactly
the global part's keys ``0 .. p``. One joint softmax over them is the causal row, up to float rounding.

Grouped-query attention (``num_kv_heads``; ``grouped_kv="shared"``): the random blocks are drawn per query block and
shared by every head (one ``random_blocks`` buffer), so the query heads of a group read the same key blocks and the
blocked executor folds them into the rows of one block against the group's keys (:mod:`attentions._blocked`: no
repeated k, v); the KV cache holds ``num_kv_heads`` heads, gathered once per key-value head and read by its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _blocked as blk
from ._kv_slots import KVSlots, attend_slots, check_slots, fill_slots, write_slots
from .base import Attention
from .registry import AttentionConfig, register_attention, require

# Rows drawn at once when sampling random blocks (bounds the (rows, blocks) score table).
_DRAW_ROWS = 1024


@dataclass(frozen=True)
class BigBirdConfig(AttentionConfig):
    """``block_size`` tokens per block; ``num_global_blocks`` leading global blocks; ``num_random_blocks`` per row.

    ``max_seq_len`` is required: the random blocks are drawn once for its blocks. A ``block_size``
    at or above ``max_seq_len`` is allowed and makes one block, i.e. full attention.
    ``recompute``: as in ``sliding_window`` (True: rebuild the blocked scores in backward, O(n d) memory;
    False: keep the blocked probabilities). Memory and time change, results do not.
    """

    block_size: int = 64
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    recompute: bool = True

    def validate(self) -> None:
        require(
            self.max_seq_len is not None,
            "max_seq_len",
            "bigbird needs an int: its random blocks are drawn once for ceil(max_seq_len / block_size) blocks",
        )
        require(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        require(self.num_global_blocks >= 0, "num_global_blocks", f"must be >= 0, got {self.num_global_blocks}")
        require(self.num_random_blocks >= 0, "num_random_blocks", f"must be >= 0, got {self.num_random_blocks}")


def draw_random_blocks(
    num_blocks: int, num_global: int, num_random: int, generator: torch.Generator, causal: bool = False
) -> torch.Tensor:
    """``(num_blocks, num_random)`` random key blocks per query block, ``-1`` for an unused slot.

    Global rows get none (they see everything). Row ``i`` draws without replacement among the
    blocks outside its band ``i-1..i+1`` and outside the global blocks (``causal``: among the past
    blocks ``g .. i-2`` only, so early rows have fewer candidates); each row is sorted with unused
    slots last.
    """
    out = torch.full((num_blocks, num_random), blk.NO_KEY, dtype=torch.long)
    if num_random == 0 or num_blocks == 0:
        return out
    cols = torch.arange(num_blocks)
    for start in range(0, num_blocks, _DRAW_ROWS):
        rows = torch.arange(start, min(start + _DRAW_ROWS, num_blocks))
        # Uniform keys in [0, 1) for candidates, -1 for excluded blocks; top-r = r distinct candidates.
        keys = torch.rand(rows.numel(), num_blocks, generator=generator)
        excluded = ((rows[:, None] - cols[None, :]).abs() <= 1) | (cols[None, :] < num_global)
        if causal:
            excluded |= cols[None, :] > rows[:, None]
        keys = keys.masked_fill(excluded, -1.0)
        top, idx = keys.topk(min(num_random, num_blocks), dim=1)
        picked = torch.where(top >= 0, idx, torch.full_like(idx, num_blocks))  # unused sorts last
        picked = picked.sort(dim=1).values
        picked = torch.where(picked == num_blocks, torch.full_like(picked, blk.NO_KEY), picked)
        out[rows, : picked.shape[1]] = picked
    out[:num_global] = blk.NO_KEY
    return out


def bigbird_state_size(config: BigBirdConfig, seq_len: int) -> int:
    """``2 d`` times the most keys a non-global query block reads: its band blocks ``i-1, i, i+1`` (causal
    ``i-1, i``; the block's last query reads all of its own block), the global blocks, and its random
    blocks of this length (the same seeded draw as the ``random_blocks`` buffer; blocks beyond the input
    hold no keys), each block counted once and the last block with its real length.

    Global query blocks read every key (``2 n d``); that is the count only when every block is global.
    """
    n, block = seq_len, config.block_size
    nb = blk.num_blocks(n, block)
    g = min(config.num_global_blocks, nb)
    if g == nb:
        return 2 * config.head_dim * n
    generator = torch.Generator().manual_seed(config.seed)
    drawn = draw_random_blocks(blk.num_blocks(config.max_seq_len, block), config.num_global_blocks,
                               config.num_random_blocks, generator, causal=config.causal)[g:nb]
    rows = torch.arange(g, nb)
    read = torch.zeros(nb - g, nb + 1, dtype=torch.bool)  # column nb collects unused / out-of-input slots
    read[:, :g] = True
    for offset in (-1, 0) if config.causal else (-1, 0, 1):
        read[torch.arange(nb - g), (rows + offset).clamp(0, nb)] = True
    read[torch.arange(nb - g)[:, None], torch.where((drawn >= 0) & (drawn < nb), drawn, nb)] = True
    lengths = torch.full((nb,), block)
    lengths[-1] = n - (nb - 1) * block
    return 2 * config.head_dim * int((read[:, :nb].long() * lengths).sum(dim=1).max())


@register_attention(
    "bigbird",
    config=BigBirdConfig,
    family="sparse",
    rotary_note="exact RoPE on its blocks: each kept score is q_i^T R_(j-i) k_j (RoFormer eq. 16); which blocks a row "
                "keeps (global, random) still depends on absolute block positions",
    supports_causal=True,
    causal_note="left part: blocks i-1, i (j <= i inside), global keys, random blocks among past blocks",
    time_complexity="O(n b (3 + g + r) d)",
    memory_complexity="O(n d); O(n b (3 + g + r)) with recompute=false",
    exact=True,
    state_size_fn=bigbird_state_size,
    needs_max_seq_len=True,
    supports_decoding=True,
    decoding_note="KV cache of the whole past (random blocks may reach any past block); a step gathers the global, "
                  "band and its random blocks' keys j <= p",
    state_growth="linear",
    grouped_kv="shared",
    grouped_kv_note="training: a group's query heads folded into the rows of its blocks (random blocks are per block, "
                    "shared by all heads; k, v not repeated); decoding: a KV cache of num_kv_heads heads",
)
class BigBirdAttention(Attention):
    """BigBird attention: 3-block band, global blocks and seeded random blocks (ITC)."""

    random_blocks: torch.Tensor

    def __init__(self, config: BigBirdConfig) -> None:
        super().__init__(config)
        generator = torch.Generator().manual_seed(config.seed)
        max_blocks = blk.num_blocks(config.max_seq_len, config.block_size)
        self.register_buffer(
            "random_blocks",
            draw_random_blocks(max_blocks, config.num_global_blocks, config.num_random_blocks, generator,
                               causal=config.causal),
        )

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        parts = bigbird_parts(q.shape[2], cfg.block_size, cfg.num_global_blocks, self.random_blocks.to(q.device),
                              cfg.causal)
        run = blk.attend_recompute if cfg.recompute else blk.attend_stored
        return run(q, k, v, parts, key_padding_mask, cfg.dropout if self.training else 0.0)

    # Decoding: the whole past's KV cache, read through the causal row's pattern (module docstring).
    # Inference only: no dropout in the step.

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVSlots:
        return KVSlots(batch, max_len, max_len, self.config.kv_heads, self.config.head_dim, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=state.max_len)
        fill_slots(state.k, state.v, k, v, None)  # slots >= n: a copy of the prompt (padded slots zero)
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=state.max_len)
        cfg = self.config
        pos = state.lengths
        write_slots(state.k, state.v, k, v, pos)
        key_pos, allowed = step_keys(pos, cfg.block_size, cfg.num_global_blocks, self.random_blocks.to(pos.device),
                                     state.max_len)
        batch, kv_heads, _, d = state.k.shape
        index = key_pos.clamp(0, state.max_len - 1)[:, None, :, None].expand(batch, kv_heads, -1, d)
        return attend_slots(q, state.k.gather(2, index), state.v.gather(2, index), allowed)


def step_keys(pos: torch.Tensor, block: int, num_global: int, random_blocks: torch.Tensor, max_len: int,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The key positions a causal query at ``pos`` ``(batch,)`` (each ``< max_len``) reads: ``(batch, K)`` long
    positions (``NO_KEY`` or beyond ``pos``: none) and ``(batch, K)`` bool allowed, ``K = min(g b, max_len) + (2 + r)
    b``.

    Segments: the global positions ``0 .. min(g b, max_len) - 1``; the band blocks ``i - 1, i`` (``i = pos //
    block``), masked where they lie in a global block (the global segment holds those keys); the random blocks
    ``random_blocks[i]``; every key ``j <= pos``. The module docstring says why this is the causal row of
    :func:`bigbird_parts`.
    """
    n_glob = num_global * block
    row = pos // block
    glob = torch.arange(min(n_glob, max_len), device=pos.device).expand(pos.shape[0], -1)
    band = (row - 1)[:, None] * block + torch.arange(2 * block, device=pos.device)
    rand = blk.block_positions(random_blocks[row], block)
    key_pos = torch.cat([glob, band, rand], dim=1)
    allowed = (key_pos >= 0) & (key_pos <= pos[:, None])
    first_band = glob.shape[1]
    allowed[:, first_band: first_band + 2 * block] &= band >= n_glob
    return key_pos, allowed


def bigbird_parts(n: int, block: int, num_global: int, random_blocks: torch.Tensor, causal: bool) -> list[blk.Part]:
    """The global rows (the first ``g`` blocks) over every key (causal: the keys up to themselves, all inside
    the first ``g b`` positions), then the local query blocks ``g .. nb - 1``: band blocks ``i-1, i, i+1``
    (causal ``i-1, i`` with ``j <= i`` in the own block), then the random blocks, then the global keys.

    ``random_blocks``: the ``(blocks, r)`` buffer drawn for ``max_seq_len``; blocks beyond this input hold no
    keys. The band's left block of row ``g`` is global block ``g - 1``: masked there, counted once, in the
    global keys.
    """
    nb = blk.num_blocks(n, block)
    g = min(num_global, nb)
    n_glob = min(g * block, n)
    parts = []
    if n_glob:
        parts.append(blk.Part((0, n_glob), None, prefix=n_glob if causal else n,
                              pattern=blk.causal_pattern if causal else None))
    if g == nb:
        return parts
    rand = random_blocks[g:nb]
    rand = torch.where(rand < nb, rand, torch.full_like(rand, blk.NO_KEY))  # beyond this input: no key
    gathered = torch.cat([blk.block_positions(rand, block),
                          torch.arange(n_glob, device=rand.device).expand(nb - g, -1)], dim=1)
    band_slots = (3 - causal) * block

    def pattern(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        # Random and global blocks are all in the past; only the own block needs j <= i when causal.
        allowed = key_pos <= query_pos if causal else torch.ones_like(key_pos, dtype=torch.bool)
        if g:
            is_band = torch.arange(key_pos.shape[-1], device=key_pos.device) < band_slots
            allowed = allowed & ~(is_band & (key_pos < n_glob))
        return allowed

    local = blk.Part((g * block, n), block, band=(1, 0 if causal else 1),
                     gathered=gathered if gathered.shape[1] else None, pattern=pattern if causal or g else None)
    return parts + [local]
