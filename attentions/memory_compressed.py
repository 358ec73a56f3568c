"""Memory-compressed attention (Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences").

Keys and values are compressed along the sequence into ``m = ceil(n / c)`` slots, then every
query attends to the slots with exact softmax attention:

- ``conv`` (the paper): a learned strided convolution, kernel = stride = ``compression`` c,
  one per head and one each for keys and values (weights ``(heads, c * head_dim, head_dim)``,
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Attention
from .registry import AttentionConfig, register_attention, require


@dataclass(frozen=True)
class MemoryCompressedConfig(AttentionConfig):
    compression: int = 3
    compression_type: Literal["conv", "mean"] = "conv"

    def validate(self) -> None:
        require(self.compression >= 1, "compression", f"must be >= 1 (tokens per slot), got {self.compression}")


@register_attention(
    "memory_compressed",
    config=MemoryCompressedConfig,
    family="memory-compression",
    time_complexity="O(n^2 d / c)",
    memory_complexity="O(n^2 / c) scores (n queries x n/c slots); O(n d) with a fused SDPA kernel",
    needs_max_seq_len=False,
)
class MemoryCompressedAttention(Attention):
    """Memory-compressed attention: keys/values compressed by a strided convolution, then softmax."""

    def __init__(self, config: MemoryCompressedConfig) -> None:
        super().__init__(config)
        if config.compression_type == "conv":
            gen = torch.Generator().manual_seed(config.seed)
            fan_in = config.compression * config.head_dim
            shape = (config.num_heads, fan_in, config.head_dim)
            # Rows of a kernel are ordered (position within the slot, input channel).
            self.key_kernel = nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(fan_in))
            self.value_kernel = nn.Parameter(torch.randn(shape, generator=gen) / math.sqrt(fan_in))

    def attend(self, q, k, v, key_padding_mask):
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
            real = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
        counts = F.pad(real, (0, extra)).view(batch, slots, c).sum(dim=-1)  # real tokens per slot
        slot_mask = counts > 0

        if cfg.compression_type == "conv":
            # kernel = stride = c: each slot is a linear map of its c tokens' concatenated channels.
            k_slots = torch.matmul(k.reshape(batch, heads, slots, c * dim), self.key_kernel.to(k.dtype))
            v_slots = torch.matmul(v.reshape(batch, heads, slots, c * dim), self.value_kernel.to(v.dtype))
        else:
            denom = counts.clamp_min(1).to(k.dtype)[:, None, :, None]
            k_slots = k.view(batch, heads, slots, c, dim).sum(dim=3) / denom
            v_slots = v.view(batch, heads, slots, c, dim).sum(dim=3) / denom

        attn_mask = None
        if key_padding_mask is not None:
            # A sequence with no real token would give all-masked rows (NaN); let it attend
            # everywhere: its outputs are padding and may be anything finite.
            slot_mask = slot_mask | ~slot_mask.any(dim=-1, keepdim=True)
            attn_mask = slot_mask[:, None, None, :]
        dropout = cfg.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k_slots, v_slots, attn_mask=attn_mask, dropout_p=dropout)
