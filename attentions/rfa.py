"""Random Feature Attention (Peng et al. 2021, arXiv:2103.02143), bidirectional form.

Random Fourier features (Rahimi & Recht 2007): for ``w ~ N(0, sigma^-2 I_d)``

    phi(x) = D^-1/2 [sin(w_1.x), cos(w_1.x), ..., sin(w_D.x), cos(w_D.x)]
    E[phi(x) . phi(y)] = exp(-|x - y|^2 / (2 sigma^2))

RFA l2-normalises queries and keys first. For unit vectors ``|x - y|^2 = 2 - 2 x.y``, so the
Gaussian kernel is ``exp(-1/sigma^2) exp(x.y / sigma^2)``: the constant cancels in the
normalisation and the estimator targets

    softmax(Q^ K^T^ / sigma^2) V        (Q^, K^: row-normalised q, k)

not ``softmax(q k^T / sqrt(d))``: ``sigma^2`` plays the role of the temperature. Computed as
``phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))`` in ``O(n D d)`` time and ``O(n D)`` memory.

Causal (``causal=True``): the paper's causal RFA (the form of its language models) without the
optional gate: ``out_t = phi(q_t)^T S_t / phi(q_t)^T z_t`` with ``S_t = S_{t-1} + phi(k_t) v_t^T`` and
``z_t = z_{t-1} + phi(k_t)``. The recurrence is evaluated as chunked prefix sums (a masked ``(C, C)``
product inside each chunk, one carried state per chunk; ``causal_linear_attention``), so memory is
``O(n D + n C)``, never the ``(n, D, d)`` of per-token states. sin/cos features are bounded, so no
stabiliser is needed; the denominator floor counts the real keys up to each row.

Rotary positions (``model.pos_emb=rope``; the backbone rotates q and k before this mechanism, ``attentions.rotary``):
a rotation keeps ``|x|``, so normalising commutes with it, and for unit ``q, k`` the features estimate
``exp(-|R_i q - R_j k|^2 / (2 sigma^2)) = exp(-1/sigma^2) exp(q^T R_(j-i) k / sigma^2)`` (RoFormer eq. 16): a kernel
of the offset ``j - i`` only, in expectation over ``omega`` (one draw's error depends on absolute positions). With
``learn_sigma`` the bandwidth is per dimension, ``|diag(sigma)^-1 (R_i q - R_j k)|``, and that is a function of the
offset only where both dimensions of each rotated pair (``2a``, ``2a + 1``) share one bandwidth; a learned
bandwidth need not. RoFormer sec. 3.3 (eq. 19) rotates the feature vectors instead; here the rotation comes before
the feature map, as for every mechanism.

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): the frequencies ``omega`` are
shared by all heads, so ``phi(K)`` of a key-value head, hence its sums ``phi(K)^T [V, 1]`` (causal: the chunk
states; decoding: the state), can serve all ``g`` query heads of its group, provided the bandwidth does too. With
``learn_sigma`` the bandwidth ``sigma`` scales the frequencies of both sides (``w = omega / sigma``: a kernel
``k(q, k) = exp(-|q^ - k^|^2 / 2 sigma^2)`` of the pair), so a bandwidth per *query* head would give each query head
its own key features, and nothing to share. The bandwidth is therefore a parameter of the key-value head: shape
``(num_kv_heads, head_dim)``, its group's query heads scaled by it (with ``num_kv_heads = num_heads``, the earlier
per-head bandwidth). The group's query heads then read one set of sums: decode state exactly ``1/g``. A grouped
model thus learns ``g`` times fewer bandwidths; ungrouped it is unchanged. The denominator floor uses the smallest
bandwidth of the module, as before. RFA's optional gate is not implemented (nothing per head to share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._lean_linear import (
    FeatureMap,
    FeatureSumState,
    group_heads,
    lean_linear_attention,
    prefix_sums,
    query_sums,
    step_sums,
    ungroup_heads,
)
from ._random_features import causal_linear_attention, draw_generator, gaussian_projection, linear_attention
from .base import Attention
from .functional import zero_padded_values
from .registry import AttentionConfig, register_attention, require


@dataclass(frozen=True)
class RFAConfig(AttentionConfig):
    """``num_features``: D random frequencies (2D features). ``sigma``: kernel bandwidth, the
    frequencies are ``N(0, sigma^-2 I)``. ``learn_sigma``: learn one bandwidth per key-value head and
    dimension (initialised at ``sigma``; per head without grouped-query attention) instead of keeping it
    fixed. ``recompute``: True = features computed chunk by chunk and recomputed in backward (only O(n d)
    tensors kept: memory near full attention's); False = the stored autograd path (the (n x 2D) features
    kept for backward). Changes memory and time, not results (equal up to float rounding)."""

    num_features: int = 128
    sigma: float = 1.0
    learn_sigma: bool = False
    recompute: bool = True

    def validate(self) -> None:
        require(self.num_features >= 1, "num_features", f"must be >= 1, got {self.num_features}")
        require(self.sigma > 0 and math.isfinite(self.sigma), "sigma", f"must be a positive number, got {self.sigma}")


def rfa_state_size(config: RFAConfig, seq_len: int) -> int:
    """The feature sums over ``2 D`` sin/cos features: ``phi(K)^T V`` (2D x d) and ``phi(K)^T 1`` (2D), i.e.
    ``2 D (d + 1)``, whatever ``n``. No gate (ours has none), so nothing else is carried."""
    return 2 * config.num_features * (config.head_dim + 1)


@register_attention(
    "rfa",
    config=RFAConfig,
    family="kernel",
    rotary_note="normalising commutes with the rotation and phi(R_i q)^T phi(R_j k) estimates exp(q^T R_(j-i) k / "
                "sigma^2) (unit q, k) up to a constant: relative in expectation over w; learn_sigma's per-dimension "
                "bandwidth keeps that only where both dimensions of a rotated pair share it (RoFormer sec. 3.3 rotates "
                "the features instead, eq. 19)",
    supports_causal=True,
    causal_note="RFA's causal recurrence (no gate) as chunked prefix sums, O(n D + n C) memory",
    time_complexity="O(n D d), D = num_features",
    memory_complexity="O(n D + D d)",
    exact=False,
    needs_max_seq_len=False,
    applies_dropout=False,
    state_size_fn=rfa_state_size,
    supports_decoding=True,
    decoding_note="RFA's recurrence itself: the (2D, d+1) sums phi(K)^T [V, 1] plus one key per step, the "
                  "denominator floor counting the keys so far, as the causal form's prefix sums",
    state_growth="constant",
    grouped_kv="shared",
    grouped_kv_note="shared frequencies and a bandwidth per key-value head (learn_sigma: (num_kv_heads, head_dim), "
                     "its query heads scaled by it), so the sums phi(K)^T [V, 1] (causal: chunk states; decoding: the "
                     "state) are per key-value head, read by its query heads",
)
class RFAAttention(Attention):
    """Random Feature Attention: random Fourier features on l2-normalised queries and keys.

    Random state: ``omega`` (D, d), standard Gaussian rows shared by all heads, a registered
    buffer drawn from ``seed``; the frequencies are ``omega / sigma``. With ``learn_sigma`` the
    bandwidth is ``exp(log_sigma)``, a parameter of shape (kv_heads, head_dim) (kv_heads = num_heads
    without grouped-query attention; a key-value head's query heads share its bandwidth, module
    docstring): RFA's learned random-feature variance (frequencies ``sigma``-scaled elementwise),
    kept positive by the log parametrisation. Features are fixed (no redraw); the paper resamples them during training.

    Denominator: sin/cos features are not positive, so the estimate of ``sum_j k(q, k_j)`` can be
    tiny or negative. The exact value is at least ``n_real * exp(-2 / sigma_min^2)`` (unit vectors
    are at most 2 apart), so the estimate is clamped from below at that floor (itself kept above
    the compute dtype's smallest normal): the clamp only acts where the estimate is impossible, and keeps
    outputs finite and bounded by ``|numerator| / floor``.

    Padding: padded keys and values are zeroed and their rows left out of ``phi(K)^T [V, 1]``.
    Dropout: there is no explicit probability matrix, so ``dropout`` is accepted but not applied.
    """

    def __init__(self, config: RFAConfig) -> None:
        super().__init__(config)
        generator = draw_generator(config.seed, 0)
        self.register_buffer("omega", gaussian_projection(config.num_features, config.head_dim, generator))
        if config.learn_sigma:
            self.log_sigma = nn.Parameter(torch.full((config.kv_heads, config.head_dim), math.log(config.sigma)))
        else:
            self.log_sigma = None

    def bandwidth(self) -> torch.Tensor:
        """``sigma`` broadcastable to (batch, kv_heads, seq, head_dim): a scalar, or ``(1, kv_heads, 1, head_dim)``."""
        if self.log_sigma is None:
            return self.omega.new_tensor(self.config.sigma)
        return self.log_sigma.exp()[None, :, None, :]

    def _grouped_bandwidth(self, batch: int) -> torch.Tensor:
        """The bandwidth in :func:`attentions._lean_linear.group_heads`' layout: ``(batch kv_heads, 1, 1, head_dim)``
        (key-value heads on the batch axis), or the scalar."""
        sigma = self.bandwidth()
        if sigma.dim() == 0:
            return sigma
        return sigma.expand(batch, -1, -1, -1).reshape(-1, 1, 1, sigma.shape[-1])

    def feature_maps(
        self, q: torch.Tensor, k: torch.Tensor, sigma: torch.Tensor | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((sin, cos) of Q^, (sin, cos) of K^)``, each ``(batch, heads, seq, D)``.

        ``phi(x)`` is the concatenation of the pair times ``D^-1/2``; that factor cancels in the
        attention's ratio and is left out (the denominator floor is scaled to match). ``sigma``: the
        bandwidth broadcastable to q and k (None: :meth:`bandwidth`).
        """
        compute = torch.promote_types(q.dtype, torch.float32)
        sigma = (self.bandwidth() if sigma is None else sigma).to(compute)
        omega_t = self.omega.to(compute).T
        # w.x with w = omega / sigma (elementwise) == omega . (x / sigma).
        q_proj = torch.matmul(F.normalize(q.to(compute), dim=-1) / sigma, omega_t)
        k_proj = torch.matmul(F.normalize(k.to(compute), dim=-1) / sigma, omega_t)
        return _SinCos.apply(q_proj), _SinCos.apply(k_proj)

    def denominator_floor(
        self, key_padding_mask: torch.Tensor | None, seq: int, dtype: torch.dtype, causal: bool = False
    ) -> torch.Tensor:
        """Smallest possible ``sum_j k(q, k_j)``: ``n_real * exp(-2 / sigma_min^2)``, shape (batch|1, 1, 1, 1);
        ``causal``: per row, ``n_real`` counting the real keys up to it, shape (batch|1, 1, seq, 1)."""
        sigma_min = self.bandwidth().to(dtype).min()  # not detached: clamped rows depend on it
        floor = torch.exp(-2.0 / sigma_min.square()).clamp_min(torch.finfo(dtype).tiny)
        if key_padding_mask is None and causal:
            n_real = torch.arange(1, seq + 1, dtype=dtype, device=floor.device)[None, None, :, None]
        elif key_padding_mask is None:
            n_real = torch.tensor(float(seq), dtype=dtype, device=floor.device)
        elif causal:
            n_real = key_padding_mask.cumsum(-1).to(dtype)[:, None, :, None]
        else:
            n_real = key_padding_mask.sum(-1).to(dtype)[:, None, None, None]
        return floor * n_real.clamp_min(1.0)

    def attend(self, q, k, v, key_padding_mask):
        if self.config.kv_groups > 1:  # the group's query heads on the head axis, key-value heads on the batch axis
            batch = q.shape[0]
            out = self._attend(*group_heads(q, k, v, key_padding_mask), self._grouped_bandwidth(batch))
            return ungroup_heads(out, batch)
        return self._attend(q, k, v, key_padding_mask, self.bandwidth())

    def _attend(self, q, k, v, key_padding_mask, sigma):
        """RFA of q ``(B, h, n, d)`` and k, v ``(B, h, n, d)`` or ``(B, 1, n, d)`` (one key-value head for the ``h``
        query heads; :func:`attentions._lean_linear.group_heads`), bandwidth ``sigma`` broadcastable to k."""
        if self.config.recompute:
            return self._lean_attend(q, k, v, key_padding_mask, sigma)
        if self.config.causal:
            return self._causal_attend(q, k, v, key_padding_mask, sigma)
        # Padded contents never reach sin/cos (no NaN * 0); linear_attention drops their rows.
        phi_q, phi_k = self.feature_maps(q, zero_padded_values(k, key_padding_mask), sigma)
        floor = self.denominator_floor(key_padding_mask, q.shape[-2], phi_q[0].dtype).to(phi_q[0].device)
        return linear_attention(phi_q, phi_k, v, key_padding_mask, min_denominator=floor * self.config.num_features)

    def _causal_attend(self, q, k, v, key_padding_mask, sigma):
        """Causal RFA: chunked prefix sums; the denominator floor counts the real keys up to each row."""
        phi_q, phi_k = self.feature_maps(q, zero_padded_values(k, key_padding_mask), sigma)
        floor = self.denominator_floor(key_padding_mask, q.shape[-2], phi_q[0].dtype, causal=True).to(q.device)
        floor = floor * self.config.num_features
        return causal_linear_attention(phi_q, phi_k, v, key_padding_mask, min_denominator=floor)


    def _lean_attend(self, q, k, v, key_padding_mask, sigma):
        """The recomputing path (:mod:`attentions._lean_linear`): the same features, floor and padding rules."""
        compute = torch.promote_types(q.dtype, torch.float32)
        causal = self.config.causal
        floor = self.denominator_floor(key_padding_mask, q.shape[-2], compute, causal=causal).to(q.device)
        fmap = _FourierMap(self.omega.to(compute))
        sigma = sigma.to(compute)
        return lean_linear_attention(fmap, q, k, v, key_padding_mask, floor * self.config.num_features,
                                     causal=causal, params=(sigma,))

    # ------------------------------------------------------------------------------------------- decoding
    # Why a step equals the causal forward: the causal form is RFA's recurrence S_t = S_{t-1} + phi(k_t) [v_t, 1]^T,
    # out_t = phi(q_t)^T S_t ratio, evaluated as chunked prefix sums with the floor n_real(t) exp(-2 / sigma_min^2)
    # D (n_real(t) = real keys up to t). The state is S after the prefix; a step adds the new key and reads S with
    # the new query, the floor counting lengths + 1 keys: the same sums, so the same output up to float rounding.
    # sin/cos features are bounded: no stabiliser. Sums in float32 (or wider) whatever the input dtype.

    def _decode_map(self, dtype: torch.dtype) -> tuple[FeatureMap, tuple[torch.Tensor, ...]]:
        return _FourierMap(self.omega.to(dtype)), (self.bandwidth().to(dtype),)

    def new_state(self, batch, max_len, dtype, device):
        # One state per key-value head (grouped_kv='shared'): the hooks get k, v with kv_heads heads.
        return FeatureSumState(batch, max_len, self.config.kv_heads, 2 * self.config.num_features,
                               self.config.head_dim, torch.promote_types(dtype, torch.float32), device, exp=False)

    def prefill_state(self, q, k, v, key_padding_mask, state):
        fmap, params = self._decode_map(state.sums.dtype)
        state.sums, _ = prefix_sums(fmap, key_padding_mask, k, v, params, state.sums.dtype)
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        dtype = state.sums.dtype
        fmap, params = self._decode_map(dtype)
        step_sums(fmap, state.sums, None, k, v, params)
        # The causal floor of a row with n_real real keys so far: (floor * n_real) * D, in that order.
        n_real = (state.lengths + 1).to(dtype)[:, None, None, None]
        floor = self.denominator_floor(None, 1, dtype).to(q.device) * n_real * self.config.num_features
        return query_sums(fmap, state.sums, None, q, floor, params)


class _FourierMap(FeatureMap):
    """``[sin u, cos u]``, ``u = (x / |x|) / sigma . omega^T``, for the recomputing path (2D features, the
    ``D^-1/2`` factor left out as in :meth:`RFAAttention.feature_maps`). ``params = (sigma,)``: a scalar or a
    tensor broadcastable to the keys (``(1, kv_heads, 1, head_dim)``; grouped layout ``(batch kv_heads, 1, 1,
    head_dim)``), with its gradient when learned."""

    exp = False

    def __init__(self, omega: torch.Tensor) -> None:
        self.omega = omega  # (D, d)

    def num_features(self) -> int:
        return 2 * self.omega.shape[0]

    def project(self, x, side, params):
        u = torch.matmul(F.normalize(x, dim=-1) / params[0].to(x.dtype), self.omega.to(x.dtype).T)
        # One concatenated tensor (one matmul per use). Not sin/cos written into halves of one buffer: with 2
        # threads an elementwise op into a strided half ran 1.6x slower than sin, cos and the copy together.
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1)

    def project_backward(self, x, t, grad_t, side, params, param_grads):
        sin, cos = t.chunk(2, dim=-1)
        grad_sin, grad_cos = grad_t.chunk(2, dim=-1)
        grad_u = torch.addcmul(grad_sin * cos, grad_cos, sin, value=-1.0)
        grad_z = torch.matmul(grad_u, self.omega.to(x.dtype))  # z = x^ / sigma
        sigma = params[0].to(x.dtype)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        unit = x / norm.clamp_min(1e-12)  # F.normalize's eps
        if params[0].requires_grad:  # dz/dsigma = -z / sigma
            param_grads[0] += (-(grad_z * unit) / sigma.square()).sum_to_size(params[0].shape)
        grad_unit = grad_z / sigma
        # x^ = x / max(|x|, eps): (I - x^ x^T) / |x| where |x| > eps, 1 / eps where the clamp holds.
        radial = torch.where(norm > 1e-12, (unit * grad_unit).sum(-1, keepdim=True), torch.zeros_like(norm))
        return (grad_unit - unit * radial) / norm.clamp_min(1e-12)


def kernel_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """What RFA estimates, computed exactly: ``softmax(Q^ K^^T / sigma^2) V`` with l2-normalised rows
    ``Q^``, ``K^`` (the Gaussian kernel on unit vectors, module docstring), in float64.

    Shapes ``(batch, heads, seq, head_dim)``; returns float64. RFA's approximation error is measured
    against this, not against ``softmax(q k^T / sqrt(d))``, which it does not approximate.
    """
    qn, kn = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    return torch.softmax(qn @ kn.transpose(-1, -2) / float(sigma) ** 2, dim=-1) @ v.double()


class _SinCos(torch.autograd.Function):
    """``(sin u, cos u)`` saving only its outputs: the backward ``g_s cos u - g_c sin u`` reuses
    them (the matmuls that consume them keep them alive anyway) instead of recomputing sin/cos."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sin, cos = torch.sin(u), torch.cos(u)
        ctx.save_for_backward(sin, cos)
        return sin, cos

    @staticmethod
    def backward(ctx, grad_sin: torch.Tensor, grad_cos: torch.Tensor) -> torch.Tensor:
        sin, cos = ctx.saved_tensors
        return torch.addcmul(grad_sin * cos, grad_cos, sin, value=-1.0)
