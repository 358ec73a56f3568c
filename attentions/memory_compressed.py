"""Memory-compressed attention (Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences").

Keys and values are compressed along the sequence into ``m = ceil(n / c)`` slots, then every
query attends to the slots with exact softmax attention:

- ``conv`` (the paper): a learned strided convolution, kernel = stride = ``compression`` c,
  one per key-value head and one each for keys and values (weights ``(kv_heads, c * head_dim, head_dim)``,
  no bias, drawn from ``seed`` as N(0, 1 / (c * head_dim)) so a slot keeps the scale of a
  token and the softmax temperature is unchanged at initialisation).
- ``mean``: mean over the real tokens of each slot (no parameters).

Padding: padded keys/values are zeroed before compression, a length not divisible by c is
padded internally with zeros, and slots holding no real token are masked out. A slot that
is partly padding is built from its real tokens only (the zeros add nothing to the
convolution, and ``mean`` divides by the real count), so appending padding changes nothing.

Cost: the score matrix is ``n x m = n^2 / c``: time O(n^2 d / c); memory O(n^2 / c) with an
explicit softmax (less when PyTorch's SDPA picks a fused kernel, which it may on any
device). ``dropout`` is dropout on the slot probabilities in training mode.

Causal (``causal=True``): the paper used memory-compressed attention in a decoder (T-DMCA) but says
little about how compressed slots are masked; a slot that mixes a query's future would leak it.
Ours: query ``i`` in block ``b = i // c`` attends to the slots of the fully past blocks ``0 .. b-1``
and, exactly, to the tokens of its own block up to itself, in one joint softmax. Computed in query
pieces of ``CAUSAL_PIECE`` tokens under activation checkpointing (each piece's scores are
``piece x (n / c + piece)``, recomputed in the backward), so memory stays O(n d) plus one piece and
time is about half the bidirectional form's O(n^2 d / c), plus one recomputed forward.

Rotary positions (``model.pos_emb=rope``, ``attentions.rotary``): the backbone rotates q and k before this mechanism,
so a slot compresses rotated keys. ``mean``: a slot's score is the mean of ``q_i^T R_(j-i) k_j`` (RoFormer eq. 16) over
its tokens, relative term by term. ``conv``: the learned weights mix the dimensions of ``R_j k_j``, so a slot is no
longer a rotated vector and its score is no function of the offsets (the convolution sees absolute phases). The
causal form's own-block tokens are exact keys, scored as RoPE's ``q_i^T R_(j-i) k_j``.

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): a slot is made from keys (values)
only, so the compression kernels belong to the key-value head (``(num_kv_heads, c * head_dim, head_dim)``) and the
slots are made once per key-value head. Its ``g`` query heads attend to them as ``g`` blocks of rows of one head
(queries ``(b, h_kv, g n, d)`` against slots ``(b, h_kv, m, d)``: a grouped matmul, nothing repeated; causal: each
piece's block mask tiled over the group). Decoding holds slots and the current block per key-value head: ``1/g``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _blocked as blk
from ._dropout import draw_seed
from ._full_chunked import chunked_attention
from ._grouped import query_rows
from .base import Attention
from .decoding import DecodeState, write_positions
from .registry import AttentionConfig, register_attention, require

# Queries per checkpointed piece of the causal form (rounded down to a multiple of the compression). A piece's
# recomputed (piece x (n / c + piece)) probabilities and their gradient set the backward's peak: 128 keeps
# n = 4096 (c = 3, batch 2, 4 heads of 32) at 43 MiB fwd+bwd, within 2x full's 22 MiB (256: 58 MiB, about
# 3% faster in paired runs).
CAUSAL_PIECE = 128


@dataclass(frozen=True)
class MemoryCompressedConfig(AttentionConfig):
    """``compression``: tokens per slot (c). ``recompute``: with attention dropout in training on a CPU, attend to
    the slots with the chunked recomputing path (:mod:`attentions._full_chunked`, O(n d) kept for backward)
    instead of SDPA, whose CPU dropout path stores the ``n x n/c`` probabilities and mask; changes memory and
    time, not results (the masks differ in how they are drawn, not in their law)."""

    compression: int = 3
    compression_type: Literal["conv", "mean"] = "conv"
    recompute: bool = True

    def validate(self) -> None:
        require(self.compression >= 1, "compression", f"must be >= 1 (tokens per slot), got {self.compression}")


def memory_compressed_state_size(config: MemoryCompressedConfig, seq_len: int) -> int:
    """The compressed key and value slots, ``2 d ceil(n / c)``. Causal: query ``i`` reads the ``i // c`` slots
    of the past blocks and the ``i % c + 1`` tokens of its own block up to itself; the most over ``i``."""
    n, c = seq_len, config.compression
    if not config.causal:
        return 2 * config.head_dim * -(-n // c)
    last = n - 1
    most = last // c + last % c + 1
    if last // c >= 1:  # the end of the block before the last may read more (when the last block is short)
        most = max(most, last // c - 1 + c)
    return 2 * config.head_dim * most


@register_attention(
    "memory_compressed",
    config=MemoryCompressedConfig,
    family="memory-compression",
    rotary_note="slots mix rotated keys: mean mode averages q_i^T R_(j-i) k_j over a slot's tokens; conv mode's "
                "weights mix dimensions, so a slot's score is no function of offsets; the causal form's own-block "
                "tokens get exact RoPE",
    supports_causal=True,
    causal_note="slots of fully past blocks plus exact attention to the own block's tokens up to the query",
    time_complexity="O(n^2 d / c)",
    memory_complexity="O(n^2 / c) scores (n queries x n/c slots); O(n d) with a fused SDPA kernel",
    needs_max_seq_len=False,
    state_size_fn=memory_compressed_state_size,
    supports_decoding=True,
    decoding_note="the compressed key/value slots of the complete past blocks plus the raw keys/values of the "
                  "current block; a block is compressed as it completes, as the causal form compresses it",
    state_growth="linear",
    grouped_kv="shared",
    grouped_kv_note="compression kernels and slots per key-value head, its query heads attending to them as rows of "
                    "one head (a grouped matmul; causal pieces tile the block mask); decoding: slots and block per "
                    "key-value head",
)
class MemoryCompressedAttention(Attention):
    """Memory-compressed attention: keys/values compressed by a strided convolution, then softmax."""

    def __init__(self, config: MemoryCompressedConfig) -> None:
        super().__init__(config)
        if config.compression_type == "conv":
            gen = torch.Generator().manual_seed(config.seed)
            fan_in = config.compression * config.head_dim
            shape = (config.kv_heads, fan_in, config.head_dim)  # slots are per key-value head
            # Rows of a kernel are ordered (position within the slot, input channel).
            self.key_kernel = nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(fan_in))
            self.value_kernel = nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(fan_in))

    def attend(self, q, k, v, key_padding_mask):
        if self.config.causal:
            return self._causal_attend(q, k, v, key_padding_mask)
        k_slots, v_slots, slot_mask = self._compress(k, v, key_padding_mask)
        attn_mask = None
        if key_padding_mask is not None:
            # A sequence with no real token would give all-masked rows (NaN); let it attend
            # everywhere: its outputs are padding and may be anything finite.
            slot_mask = slot_mask | ~slot_mask.any(dim=-1, keepdim=True)
            attn_mask = slot_mask[:, None, None, :]
        dropout = self.config.dropout if self.training else 0.0
        rows = query_rows(q, k_slots.shape[1])  # grouped: a key-value head's query heads as rows of one head
        if dropout > 0.0 and self.config.recompute and q.device.type == "cpu":
            # The dropout policy (docs/FAIRNESS.md): SDPA's CPU dropout path is the quadratic math path.
            out = chunked_attention(rows, k_slots, v_slots, slot_mask if key_padding_mask is not None else None,
                                    False, dropout, draw_seed())
        else:
            out = F.scaled_dot_product_attention(rows, k_slots, v_slots, attn_mask=attn_mask, dropout_p=dropout)
        return out.reshape(q.shape)

    def _compress(self, k, v, key_padding_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Key and value slots ``(batch, heads, ceil(n / c), dim)``; slots holding a real token ``(batch, slots)``."""
        cfg = self.config
        c = cfg.compression
        batch, heads, seq, dim = k.shape
        slots = -(-seq // c)
        extra = slots * c - seq
        if extra:
            k = F.pad(k, (0, 0, 0, extra))
            v = F.pad(v, (0, 0, 0, extra))
        real = key_padding_mask
        if real is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=k.device)
        counts = F.pad(real, (0, extra)).view(batch, slots, c).sum(dim=-1)  # real tokens per slot

        if cfg.compression_type == "conv":
            # kernel = stride = c: each slot is a linear map of its c tokens' concatenated channels.
            k_slots = torch.matmul(k.reshape(batch, heads, slots, c * dim), self.key_kernel.to(k.dtype))
            v_slots = torch.matmul(v.reshape(batch, heads, slots, c * dim), self.value_kernel.to(v.dtype))
        else:
            denom = counts.clamp_min(1).to(k.dtype)[:, None, :, None]
            k_slots = k.view(batch, heads, slots, c, dim).sum(dim=3) / denom
            v_slots = v.view(batch, heads, slots, c, dim).sum(dim=3) / denom
        return k_slots, v_slots, counts > 0

    def _causal_attend(self, q, k, v, key_padding_mask):
        """Slots of fully past blocks plus the own block's tokens up to the query, one joint softmax.

        Queries go in pieces of ``CAUSAL_PIECE`` tokens (a multiple of c, so no block straddles two
        pieces), each under activation checkpointing: only the inputs are kept, and a piece's
        ``(piece, slots + piece)`` probabilities exist only while it is computed or recomputed.
        """
        c = self.config.compression
        n = q.shape[2]
        k_slots, v_slots, slot_mask = self._compress(k, v, key_padding_mask)
        span = c * max(1, CAUSAL_PIECE // c)
        dropout = self.config.dropout if self.training else 0.0
        recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_slots, v_slots))
        pieces = []
        for start in range(0, n, span):
            stop = min(start + span, n)
            used = (stop - 1) // c  # the piece's last query sees slots 0 .. used - 1
            args = (q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], k_slots[:, :, :used],
                    v_slots[:, :, :used], None if key_padding_mask is None else
                    torch.cat([slot_mask[:, :used], key_padding_mask[:, start:stop]], dim=1))
            piece = functools.partial(_causal_piece, start=start, c=c, dropout=dropout)
            pieces.append(checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args))
        return torch.cat(pieces, dim=2)

    # ------------------------------------------------------------------------------------------- decoding
    # Why a step equals the causal forward: the causal query i (block b = i // c) attends, in one softmax, to the
    # slots of blocks 0 .. b-1 and to the tokens of its own block up to itself. A slot depends on its c tokens only
    # (the conv is kernel = stride = c, the mean averages its c real tokens), so it can be made once, when its block
    # completes, with the same product the forward uses (the c tokens' channels times the kernel). The state is
    # those slots plus the current block's raw keys/values; a step writes the new token into the block, attends to
    # the slots so far and the block up to the token, then compresses the block if the token completed it.

    def new_state(self, batch, max_len, dtype, device):
        cfg = self.config
        # Slots and block per key-value head (grouped_kv='shared'): the hooks get k, v with kv_heads heads.
        return CompressedState(batch, max_len, cfg.kv_heads, cfg.compression, cfg.head_dim, dtype,
                               torch.promote_types(dtype, torch.float32), device)

    def prefill_state(self, q, k, v, key_padding_mask, state):
        c, n = self.config.compression, q.shape[2]
        if n:
            lengths = key_padding_mask.sum(1) if key_padding_mask is not None else torch.full_like(state.lengths, n)
            k_slots, v_slots, _ = self._compress(k, v, key_padding_mask)
            # Slots of the prompt's complete blocks; past a shorter sequence's end they hold padding, never read:
            # a step reads slot s only once the sequence's own tokens completed block s and overwrote it.
            full = n // c
            state.k_slots[:, :, :full], state.v_slots[:, :, :full] = k_slots[:, :, :full], v_slots[:, :, :full]
            _fill_block(state, k, v, lengths, c)
        return self.attend(q, k, v, key_padding_mask) if n else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        c, pos = self.config.compression, state.lengths
        offset = pos % c
        write_positions((state.k_block, state.v_block), (k, v), offset)
        dtype = state.k_slots.dtype
        used = int(pos.max()) // c  # slots the furthest sequence may read
        keys = torch.cat([state.k_slots[:, :, :used], state.k_block.to(dtype)], dim=2)
        values = torch.cat([state.v_slots[:, :, :used], state.v_block.to(dtype)], dim=2)
        slot_ok = torch.arange(used, device=pos.device)[None, :] < (pos // c)[:, None]
        token_ok = torch.arange(c, device=pos.device)[None, :] <= offset[:, None]
        allowed = torch.cat([slot_ok, token_ok], dim=1)[:, None, None, :]
        # Grouped: the g query heads of a key-value head as g rows of it, one mask per sequence for all.
        out = blk.masked_attention(query_rows(q.to(dtype), keys.shape[1]), keys, values, allowed)
        done = offset == c - 1  # the token completed its block: compress it into slot pos // c
        if bool(done.any()):
            self._close_blocks(state, pos, done)
        return out.reshape(q.shape).to(q.dtype)

    def _close_blocks(self, state, pos: torch.Tensor, done: torch.Tensor) -> None:
        """Compress the current block of the sequences where ``done`` into their slot ``pos // c``."""
        c = self.config.compression
        rows = done.nonzero()[:, 0]
        dtype = state.k_slots.dtype
        blocks = (state.k_block[rows].to(dtype), state.v_block[rows].to(dtype))
        k_slot, v_slot, _ = self._compress(*blocks, None)  # one slot: (rows, heads, 1, d)
        slot = (pos[rows] // c)
        state.k_slots[rows, :, slot] = k_slot[:, :, 0]
        state.v_slots[rows, :, slot] = v_slot[:, :, 0]


class CompressedState(DecodeState):
    """Memory-compressed attention's decoding state.

    ``k_slots``, ``v_slots`` ``(batch, heads, max_len // c, d)`` (compute dtype, float32 or wider): the slots of
    the complete blocks, ``lengths // c`` of them filled per sequence; ``k_block``, ``v_block`` ``(batch, heads, c,
    d)`` (input dtype): the current block's raw keys and values, token ``p`` at ``p % c``. The block is a fixed
    buffer counted whole; only the filled slots are counted (:meth:`nbytes`), so the bytes never shrink when a
    block closes: ``2 d (lengths // c + c)`` values per head.
    """

    def __init__(self, batch: int, max_len: int, heads: int, c: int, head_dim: int, dtype: torch.dtype,
                 slot_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(batch, max_len, device)
        self.compression = c
        self.k_slots, self.v_slots = (torch.zeros(batch, heads, max_len // c, head_dim, dtype=slot_dtype,
                                                  device=device) for _ in range(2))
        self.k_block, self.v_block = (torch.zeros(batch, heads, c, head_dim, dtype=dtype, device=device)
                                      for _ in range(2))

    def nbytes(self) -> int:
        slots = int((self.lengths // self.compression).sum())
        per_slot = sum(t[0, :, :1].numel() * t.element_size() for t in (self.k_slots, self.v_slots))
        block = sum(t.numel() * t.element_size() for t in (self.k_block, self.v_block))
        return slots * per_slot + block


def _fill_block(state: CompressedState, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, c: int) -> None:
    """Each sequence's tokens after its last complete block (``length % c`` of them) into the block buffer."""
    start = (lengths // c) * c
    pos = start[:, None] + torch.arange(c, device=k.device)[None, :]  # (b, c)
    valid = (pos < lengths[:, None])[:, None, :, None]
    index = pos.clamp_max(k.shape[2] - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    for buf, t in ((state.k_block, k), (state.v_block, v)):
        buf.copy_(torch.where(valid, t.gather(2, index), torch.zeros_like(t[:, :, :1])))


def _causal_piece(q, k, v, k_slots, v_slots, real, start: int, c: int, dropout: float) -> torch.Tensor:
    """Causal memory-compressed attention of the queries ``start .. start + len(q) - 1`` (start a multiple of c).

    Query ``i`` (block ``i // c``) sees slot ``s`` iff ``s < i // c`` and token ``j`` of the piece iff it
    is in the same block and ``j <= i``. ``real``: ``(batch, slots + piece)`` key mask, or None. Grouped-query
    attention: k, v and the slots may have fewer heads than q; each key-value head's query heads are rows of it
    (:func:`query_rows`), the piece's mask repeated for each.
    """
    device = q.device
    pos = start + torch.arange(q.shape[2], device=device)
    block = torch.div(pos, c, rounding_mode="floor")
    slot_allowed = torch.arange(k_slots.shape[2], device=device)[None, :] < block[:, None]
    token_allowed = (block[:, None] == block[None, :]) & (pos[None, :] <= pos[:, None])
    allowed = torch.cat([slot_allowed, token_allowed], dim=1)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        allowed = allowed.repeat(groups, 1)  # rows ordered (query head of the group, position), as query_rows
    allowed = allowed[None, None]
    if real is not None:
        allowed = allowed & real[:, None, None, :]
    keys, values = torch.cat([k_slots, k], dim=2), torch.cat([v_slots, v], dim=2)
    out = blk.masked_attention(query_rows(q, k.shape[1]), keys, values, allowed, dropout, training=dropout > 0.0)
    return out.reshape(q.shape)
