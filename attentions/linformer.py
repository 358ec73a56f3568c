"""Linformer attention (Wang et al. 2020, arXiv:2006.04768).

Keys and values are projected along the sequence with learned ``E, F`` (n x k):

    out = softmax(Q (E^T K)^T / sqrt(d)) (F^T V)

so the score matrix is ``n x k`` instead of ``n x n``: ``O(n k d)`` time, ``O(n k)`` memory.

Rotary positions (``model.pos_emb=rope``, ``attentions.rotary``): the backbone rotates q and k before this mechanism,
and ``E`` then mixes the rotated keys along the sequence: projected key ``s`` is ``sum_j E_js R_j k_j``, so a score is
``sum_j E_js q_i^T R_(j-i) k_j``: RoPE's relative scores (RoFormer eq. 16), weighted by ``E``'s learned rows, which
belong to absolute positions. The values (``F^T V``) are not rotated.

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): ``E, F`` are shared by all heads
and act on keys and values only, so ``E^T K`` and ``F^T V`` are computed once per key-value head (``g`` times fewer
projections), and its ``g`` query heads attend to them as rows of one head (``attentions._grouped.query_rows``: one
grouped SDPA call, nothing repeated). No causal form, so no decoding state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._grouped import query_rows
from .base import Attention
from .registry import AttentionConfig, register_attention, require


@dataclass(frozen=True)
class LinformerConfig(AttentionConfig):
    """``proj_dim``: k, the projected length. ``sharing``: "none" = separate E (keys) and F
    (values); "kv" = one projection for both (the paper's key-value sharing)."""

    proj_dim: int = 256
    sharing: Literal["none", "kv"] = "none"

    def validate(self) -> None:
        require(self.max_seq_len is not None, "max_seq_len",
                "linformer's projections have one row per position: give max_seq_len (an int >= 1)")
        require(self.proj_dim >= 1, "proj_dim", f"must be >= 1, got {self.proj_dim}")


def linformer_state_size(config: LinformerConfig, seq_len: int) -> int:
    """The projected keys ``E^T K`` and values ``F^T V``: ``2 k d`` (``k = proj_dim``; also with ``sharing="kv"``,
    which shares the projection, not its two products), whatever ``n``."""
    return 2 * config.proj_dim * config.head_dim


@register_attention(
    "linformer",
    config=LinformerConfig,
    family="low-rank",
    rotary_note="rotated keys are mixed along the sequence: a projected key is sum_j E_js R_j k_j, so a score is "
                "sum_j E_js q_i^T R_(j-i) k_j, relative scores weighted by E's learned absolute-position rows",
    time_complexity="O(n k d), k = proj_dim",
    memory_complexity="O(n k + k d)",
    exact=False,
    needs_max_seq_len=True,
    state_size_fn=linformer_state_size,
    causal_note=("the learned (k, n) projection mixes every position into each compressed key, so a query would "
                 "see the future; masking it needs one projection per prefix, which loses the linear cost"),
    grouped_kv="shared",
    grouped_kv_note="E^T K and F^T V per key-value head (E, F shared by all heads), its query heads attending to them "
                    "as rows of one head",
)
class LinformerAttention(Attention):
    """Linformer: softmax attention over keys/values projected along the sequence to ``proj_dim``.

    Parameters: ``proj_k`` (max_seq_len, proj_dim) and, unless ``sharing="kv"``, ``proj_v``;
    one pair per layer shared by all heads (the paper's headwise sharing, which its reference
    implementation in fairseq uses). Layerwise sharing, one pair for the whole model, is a
    backbone matter, not this module's. Initialised as in fairseq's Linformer
    (``xavier_uniform_`` with gain ``1/sqrt(2)`` on the (proj_dim, max_seq_len) weight, i.e.
    ``U(-a, a)``, ``a = sqrt(3 / (max_seq_len + proj_dim))``), drawn from ``seed``.

    A sequence of length ``n < max_seq_len`` uses the first ``n`` rows of ``E``/``F``.
    Padding: padded keys and values are zeroed before the projection, so ``E^T K`` and ``F^T V``
    are sums over real positions only, identical to projecting the unpadded sequence. The ``k``
    projected slots themselves are not masked (each mixes all real positions; that is the
    Linformer maths), so appended padding leaves real rows unchanged.
    ``dropout`` drops the ``n x k`` attention probabilities in training mode.
    """

    def __init__(self, config: LinformerConfig) -> None:
        super().__init__(config)
        generator = torch.Generator().manual_seed(config.seed)
        bound = math.sqrt(3.0 / (config.max_seq_len + config.proj_dim))

        def init() -> nn.Parameter:
            weight = torch.empty(config.max_seq_len, config.proj_dim).uniform_(-bound, bound, generator=generator)
            return nn.Parameter(weight)

        self.proj_k = init()
        self.proj_v = init() if config.sharing == "none" else None

    def attend(self, q, k, v, key_padding_mask):
        seq = q.shape[-2]
        e = self.proj_k[:seq].to(q.dtype)
        f = e if self.proj_v is None else self.proj_v[:seq].to(q.dtype)
        # (k, n) @ (b, h_kv, n, d) -> (b, h_kv, k, d): a projection along the sequence, shared by all heads.
        k_proj = torch.matmul(e.T, k)
        v_proj = torch.matmul(f.T, v)
        dropout = self.config.dropout if self.training else 0.0
        # Exact softmax over the k projected slots; SDPA picks a fused kernel. Grouped: a key-value head's query
        # heads as rows of it (no mask, so the rows are independent).
        out = F.scaled_dot_product_attention(query_rows(q, k.shape[1]), k_proj, v_proj, dropout_p=dropout)
        return out.reshape(q.shape)
