"""Exact softmax attention, dispatched to the fastest exact kernel for the device.

Backends (chosen in one place, :func:`select_full_backend`, and recorded in ``backend``):

- ``xformers``: ``xformers.ops.memory_efficient_attention`` on CUDA when the ``cuda``
  extra is installed and the dtype is fp16/bf16/fp32.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (CPU and CUDA).
- ``reference``: explicit ``softmax(QK^T / sqrt(d)) V``, the materialised ``n x n`` matrix: the tests' ground
  truth and the benchmark's second exact baseline (LRA Table 2's and most papers' baseline).
- ``chunked``: exact attention over query chunks, recomputed in backward (:mod:`attentions._full_chunked`).
  ``auto`` picks it on a CPU in training mode with ``dropout > 0`` (and ``recompute=True``): there CPU SDPA
  leaves its fused kernel for a math path that stores the ``n x n`` probabilities and dropout mask (4.1 GB at
  n = 4096, batch 8, 2 heads, head dim 8), while this path keeps O(n d) for backward and draws its dropout masks
  from :mod:`attentions._dropout` (the dropout policy of docs/FAIRNESS.md). On CUDA the fused SDPA/xformers
  kernels apply dropout themselves and stay. It can be requested explicitly (with or without dropout).

Causal (``causal=True``, Vaswani et al.'s decoder self-attention): query ``i`` attends to keys
``j <= i``. SDPA gets ``is_causal=True`` and xformers its ``LowerTriangularMask``, both fused kernels
that never store the ``n x n`` mask; the reference path uses a dense lower-triangular mask. SDPA does
not take ``is_causal`` together with a mask, and a dense combined mask costs ``batch x n x n``, so key
padding is handled by its shape: with right padding (the decoder case, and no padding at all) every
key before a real query is real, so the causal mask alone is exact for real rows (padded rows stay
finite: ``Attention.forward`` has zeroed the padded slots). Any other padding (a gap, left
padding) gets the combined boolean mask, dense but correct.

Decoding (issue 24; :mod:`attentions._kv_slots`): a KV cache, ``(batch, heads, max_len, head_dim)`` keys and values
preallocated in the dtype given to ``init_state``, slot = position. The prefill runs the causal forward and writes
the prompt's keys and values; a step writes the new token's at slot ``lengths[b]`` and reads slots
``0 .. lengths[b]`` with the fused kernel (SDPA: over ``[:n]`` unmasked when every sequence is at the same length,
else with the boolean mask ``slot <= lengths[b]``). Why it is exact: row ``p`` of the causal forward is the softmax
of ``q_p`` over the keys ``j <= p`` times their values, and those are exactly the cache's slots ``0 .. p`` (slots
beyond ``p`` are masked or not read), so the step computes the same joint softmax, up to float rounding.

Grouped-query attention (``num_kv_heads``, Ainslie et al. 2023; ``grouped_kv="shared"``): k, v arrive with
``num_kv_heads`` heads, key-value head ``j`` serving the query heads ``j g .. j g + g - 1``. Training: SDPA reads
them in place (``enable_gqa``; the CPU fused kernel, causal or not, keeps no repeated copy: measured fwd+bwd peak at
n = 4096, batch 2, 4 heads of 32, 15.1 MiB with one key-value head against 21.1 MiB with four and 29.1 MiB when
repeating); xformers gets its 5-D grouped layout (``(batch, seq, kv_heads, g, head_dim)``, k and v expanded with
stride 0 along ``g``); ``chunked`` folds each group's query heads into the rows of one product against its
key-value head (:mod:`attentions._full_chunked`); only ``reference`` (the tests' ground truth) repeats them.
Decoding: the KV cache holds ``num_kv_heads`` heads (``1 / g`` of the ungrouped bytes), read in place by
:func:`attentions._kv_slots.attend_slots`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ._dropout import draw_seed
from ._full_chunked import chunked_attention
from ._kv_slots import KVSlots, attend_slots, check_slots, fill_slots, filled, write_slots
from .base import Attention
from .functional import causal_allowed, is_right_padded, reference_attention, repeat_kv
from .registry import AttentionConfig, register_attention

XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


def select_full_backend(
    requested: str, device_type: str, dtype: torch.dtype, has_xformers: bool, cpu_train_dropout: bool = False
) -> str:
    """The single decision of which exact kernel runs. Pure, so it is unit-tested on CPU.

    ``cpu_train_dropout``: the call applies attention dropout (training mode, ``dropout > 0``) with
    ``recompute=True`` on a CPU, where ``auto`` takes ``chunked`` (SDPA's CPU dropout path is quadratic)."""
    if requested in ("reference", "chunked"):
        return requested
    xformers_ok = device_type == "cuda" and has_xformers and dtype in XFORMERS_DTYPES
    if requested == "xformers":
        if not xformers_ok:
            raise ValueError(
                "invalid parameter 'backend': 'xformers' needs a CUDA tensor of dtype fp16/bf16/fp32 and the "
                f"'cuda' extra installed; got device={device_type}, dtype={dtype}, xformers installed={has_xformers}"
            )
        return "xformers"
    if requested == "sdpa":
        return "sdpa"
    if cpu_train_dropout and device_type == "cpu":
        return "chunked"
    return "xformers" if xformers_ok else "sdpa"


@dataclass(frozen=True)
class FullConfig(AttentionConfig):
    """``backend``: see the module docstring. ``recompute``: on a CPU in training mode with ``dropout > 0``,
    ``auto`` runs the chunked recomputing path (True) or SDPA's math path, which stores the ``n x n``
    probabilities (False). It changes memory and time, not results (both are exact attention with dropout)."""

    backend: Literal["auto", "sdpa", "xformers", "reference", "chunked"] = "auto"
    recompute: bool = True  # validated (a bool) by the registry's type check


def full_state_size(config: FullConfig, seq_len: int) -> int:
    """Every key and value: ``2 n d`` floats, the KV cache (the causal last query reads all ``n`` too)."""
    return 2 * seq_len * config.head_dim


@register_attention(
    "full",
    config=FullConfig,
    family="exact",
    rotary_note="exact RoPE: every score is (R_i q_i)^T R_j k_j = q_i^T R_(j-i) k_j (RoFormer eq. 16), a function "
                "of the offset j - i",
    time_complexity="O(n^2 d)",
    memory_complexity="O(n^2) reference; O(n) with fused SDPA/xformers kernels",
    exact=True,
    state_size_fn=full_state_size,
    supports_causal=True,
    causal_note="decoder self-attention: SDPA is_causal / xformers LowerTriangularMask; dense mask on the reference",
    supports_decoding=True,
    decoding_note="KV cache (slot = position); a step reads slots 0..p with SDPA: the causal row p's keys j <= p",
    state_growth="linear",
    grouped_kv="shared",
    grouped_kv_note="training: SDPA enable_gqa, xformers' grouped layout, chunked folds a group's query rows (no copy; "
                    "reference repeats); decoding: a KV cache of num_kv_heads heads",
)
class FullAttention(Attention):
    """Exact softmax attention (Vaswani et al. 2017)."""

    def __init__(self, config: FullConfig) -> None:
        super().__init__(config)
        self._last_backend = "not run yet"

    @property
    def backend(self) -> str:
        return self._last_backend

    def _choice(self, q: torch.Tensor) -> str:
        cfg = self.config
        cpu_train_dropout = self.training and cfg.dropout > 0.0 and cfg.recompute
        return select_full_backend(cfg.backend, q.device.type, q.dtype, xformers_available(), cpu_train_dropout)

    def compute_dtype(self, q: torch.Tensor) -> torch.dtype | None:
        """Fused kernels (SDPA, xformers) take reduced precision as given and accumulate in float32;
        the explicit reference and chunked paths follow the base policy (float32 for half inputs)."""
        if self._choice(q) not in ("reference", "chunked"):
            return None
        return super().compute_dtype(q)

    def attend(self, q, k, v, key_padding_mask):
        cfg = self.config
        choice = self._choice(q)
        self._last_backend = choice
        dropout = cfg.dropout if self.training else 0.0
        if choice == "chunked":
            seed = draw_seed() if dropout > 0.0 else 0
            return chunked_attention(q, k, v, key_padding_mask, cfg.causal, dropout, seed)
        if choice == "reference":
            # The materialised ground truth: repeating the key-value heads for their query heads (a copy) is the
            # plainest statement of grouped-query attention.
            groups = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            if cfg.causal:
                tril = causal_allowed(q.shape[-2], q.device)
                allowed = tril if allowed is None else allowed & tril
            return reference_attention(q, k, v, allowed, dropout=dropout, training=self.training)
        if cfg.causal:
            return _causal_fused(choice, q, k, v, key_padding_mask, dropout)
        if key_padding_mask is not None:
            # A sequence with no real token would give an all-masked row (NaN); let it
            # attend everywhere instead: its outputs are padding and may be anything finite.
            key_padding_mask = key_padding_mask | ~key_padding_mask.any(dim=-1, keepdim=True)
        if choice == "xformers":
            return _xformers_attention(q, k, v, key_padding_mask, dropout)
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout)

    # Decoding: the KV cache (module docstring). Inference only: no dropout in the step.

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVSlots:
        return KVSlots(batch, max_len, max_len, self.config.kv_heads, self.config.head_dim, dtype, device)

    def prefill_state(self, q, k, v, key_padding_mask, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=state.max_len)
        fill_slots(state.k, state.v, k, v, None)  # slots = max_len >= n: a copy of the prompt (padded slots zero)
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state) -> torch.Tensor:
        check_slots(self.name, state, KVSlots, slots=state.max_len)
        pos = state.lengths  # the new token's position, per sequence
        write_slots(state.k, state.v, k, v, pos)
        n = int(pos.max()) + 1
        # Every sequence at the same position: slots 0 .. n - 1 are exactly its keys j <= p, no mask needed.
        allowed = None if bool((pos == pos[0]).all()) else filled(n, pos)
        self._last_backend = "sdpa"
        return attend_slots(q, state.k[:, :, :n], state.v[:, :, :n], allowed)


def causal_mask_plan(key_padding_mask: torch.Tensor | None) -> str:
    """How a fused kernel gets causal + padding: ``"causal"`` (the causal mask alone is exact for real rows:
    no padding, or right padding) or ``"dense"`` (a combined ``(batch, 1, n, n)`` boolean mask)."""
    if key_padding_mask is None or is_right_padded(key_padding_mask):
        return "causal"
    return "dense"


def _causal_fused(choice: str, q, k, v, key_padding_mask, dropout: float) -> torch.Tensor:
    """Causal attention on SDPA or xformers, padding handled as the module docstring says."""
    plan = causal_mask_plan(key_padding_mask)
    if plan == "causal":
        if choice == "xformers":
            return _xformers_attention(q, k, v, None, dropout, causal=True)
        return _sdpa(q, k, v, dropout_p=dropout, is_causal=True)
    allowed = key_padding_mask[:, None, None, :] & causal_allowed(q.shape[-2], q.device)
    # A padded query with no real key before it would be an all-masked row (NaN): let it see every key.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if choice == "xformers":
        return _xformers_attention(q, k, v, allowed, dropout)
    return _sdpa(q, k, v, attn_mask=allowed, dropout_p=dropout)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA on q ``(batch, heads, n, d)`` and k, v ``(batch, kv_heads, n, d)``: ``enable_gqa`` when the key-value heads
    are fewer (each serves its consecutive query heads; the fused kernels read them in place, CPU included)."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **kwargs)


def _xformers_attention(q, k, v, key_padding_mask, dropout: float, causal: bool = False) -> torch.Tensor:
    """``key_padding_mask``: ``(batch, seq)`` real tokens, or a full ``(batch, 1, seq, seq)`` allowed mask.

    Runs on CUDA only; its layouts are tested on a CPU with a stand-in for ``xformers.ops``
    (tests/test_grouped_exact.py).
    """
    import xformers.ops as xops

    batch, heads, seq, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # xformers wants (batch, seq, heads, head_dim); grouped-query attention its 5-D layout (batch, seq, kv_heads,
    # groups, head_dim) with k and v expanded along the groups (stride 0: not copied).
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    if groups > 1:
        qx = qx.unflatten(2, (kv_heads, groups))
        kx, vx = (t[:, :, :, None].expand(batch, seq, kv_heads, groups, d) for t in (kx, vx))
    bias = None
    if causal:
        bias = xops.LowerTriangularMask()
    elif key_padding_mask is not None:
        allowed = key_padding_mask if key_padding_mask.dim() == 4 else key_padding_mask[:, None, None, :]
        # Additive bias (batch, heads, seq, seq); xformers requires the last dim aligned to 8,
        # so allocate padded storage and slice it.
        aligned = (seq + 7) // 8 * 8
        storage = q.new_zeros(batch, heads, seq, aligned)
        bias = storage[..., :seq]
        bias.masked_fill_(~allowed, float("-inf"))
        if groups > 1:
            bias = bias.unflatten(1, (kv_heads, groups))  # (batch, kv_heads, groups, seq, seq), as the 5-D layout
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout)
    return (out.flatten(2, 3) if groups > 1 else out).transpose(1, 2)
