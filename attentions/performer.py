"""Performer attention: FAVOR+ random features (Choromanski et al. 2021, arXiv:2009.14794).

Softmax attention is ``D^-1 A V`` with ``A_ij = exp(q_i . k_j / sqrt(d))``. FAVOR+ writes the
kernel as an expectation over Gaussian ``w``:

    exp(x . y) = E_w[ exp(w.x - |x|^2/2) exp(w.y - |y|^2/2) ],   w ~ N(0, I_d)

so with ``x = q d^-1/4``, ``y = k d^-1/4`` and ``m`` sampled rows ``w_1..w_m`` the positive
features ``phi(x) = exp(W x - |x|^2/2) / sqrt(m)`` give ``A ~= phi(Q) phi(K)^T`` and

    out = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))

in ``O(n m d)`` time and ``O(n m + m d)`` memory.

Causal (``causal=True``): the paper's unidirectional FAVOR+ (computed with prefix sums: out_i =
``phi(q_i)^T S_i / phi(q_i)^T z_i`` with ``S_i = sum_{j<=i} phi(k_j) v_j^T``, ``z_i = sum_{j<=i} phi(k_j)``).
The paper's code takes a cumulative sum of the per-token outer products, an ``(n, m, d)`` tensor (1 GiB
at n = 4096, m = 256, d = 32, batch 2, 4 heads). Here the sums are chunked (Katharopoulos et al. 2020's
chunked form): a masked ``(C, C)`` product inside each chunk of ``C`` tokens and one carried ``(m, d+1)``
state per chunk, so memory stays ``O(n m + n C)`` (see ``causal_exp_linear_attention``). Stabilised
with prefix maxima only (a global key maximum would let a later key underflow earlier ones and make
an output depend numerically on the future).

Rotary positions (``model.pos_emb=rope``; the backbone rotates q and k before this mechanism, ``attentions.rotary``):
FAVOR+ then estimates ``exp((R_i q)^T (R_j k) / sqrt(d))``, and ``(R_i q)^T (R_j k) = q^T R_(j-i) k`` (RoFormer eq. 16);
a rotation keeps ``|x|``, so the positive features' ``-|x|^2 / 2`` term is unchanged and the estimate is still
unbiased. The approximated kernel therefore depends on the offset ``j - i`` only, in expectation over the features;
one draw's error depends on the absolute positions (``W R_i q`` is not ``W q``). RoFormer sec. 3.3 (eq. 19) pairs
RoPE with linear attention differently: it rotates the feature vectors ``phi(q)``, ``phi(k)`` in the numerator and
leaves the denominator unrotated; here the rotation comes before the feature map, as for every mechanism.

Grouped-query attention (``num_kv_heads < num_heads``, ``grouped_kv="shared"``): the projection ``W`` is one
matrix for all heads, so ``phi(K)`` of a key-value head is the same for each of its ``g`` query heads. The feature
sums ``phi(K)^T [V, 1]`` (bidirectional), the causal chunk states and the decoding state are therefore computed and
held once per key-value head, and ``phi(Q)`` of each query head reads its group's (``_lean_linear.group_heads``).
The stabiliser stays per group and per row: the per-feature key maximum ``c_f`` is taken over the group's keys
(the keys every query head of the group sees, in the ratio it cancels in), the query shift over the query's own row;
so no query head's output depends on another head's queries, and each equals the ungrouped module's on the key-value
head repeated (the same features, shifts and sums), up to float rounding. Decode state: exactly ``1/g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

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
from ._random_features import (
    causal_exp_linear_attention,
    causal_linear_attention,
    draw_generator,
    gaussian_projection,
    linear_attention,
)
from .base import Attention
from .functional import zero_padded_values
from .registry import AttentionConfig, register_attention, require

# The ReLU kernel's additive floor, as in the paper's generalized-kernel code: keeps every
# feature, hence every denominator, strictly positive.
RELU_KERNEL_EPS = 1e-3


@dataclass(frozen=True)
class PerformerConfig(AttentionConfig):
    """``num_features``: m random features. ``orthogonal``: block-orthogonal rows with chi(d)
    norm correction (FAVOR+), else i.i.d. Gaussian rows. ``kernel``: "softmax" (positive random
    features, unbiased for softmax) or "relu" (``phi = relu(Wx) + eps``, a different kernel).
    ``redraw_interval``: 0 = fixed features; K > 0 = fresh features every K training-mode calls.
    ``recompute``: True = features computed chunk by chunk and recomputed in backward (only O(n d)
    tensors kept: memory near full attention's); False = the stored autograd path (the (n x m) features
    kept for backward). Changes memory and time, not results (equal up to float rounding)."""

    num_features: int = 256
    orthogonal: bool = True
    kernel: Literal["softmax", "relu"] = "softmax"
    redraw_interval: int = 0
    recompute: bool = True

    def validate(self) -> None:
        require(self.num_features >= 1, "num_features", f"must be >= 1, got {self.num_features}")
        require(self.redraw_interval >= 0, "redraw_interval",
                f"must be 0 (never redraw) or a positive number of training calls, got {self.redraw_interval}")


def performer_state_size(config: PerformerConfig, seq_len: int) -> int:
    """The feature sums a query reads: ``phi(K)^T V`` (m x d) and ``phi(K)^T 1`` (m), ``m d + m``, whatever ``n``
    (causal: the same sums over the prefix, the state carried by the recurrence)."""
    return config.num_features * (config.head_dim + 1)


@register_attention(
    "performer",
    config=PerformerConfig,
    family="kernel",
    rotary_note="phi(R_i q)^T phi(R_j k) estimates exp((R_i q)^T R_j k / sqrt d) = exp(q^T R_(j-i) k / sqrt d) without "
                "bias (|R x| = |x|): relative in expectation over the features, one draw's error depends on absolute "
                "positions (RoFormer sec. 3.3 rotates the features instead, eq. 19)",
    supports_causal=True,
    causal_note="unidirectional FAVOR+ by prefix sums, chunked: O(n m + n C) memory, running-max stabiliser",
    time_complexity="O(n m d), m = num_features",
    memory_complexity="O(n m + m d)",
    exact=False,
    needs_max_seq_len=False,
    applies_dropout=False,
    state_size_fn=performer_state_size,
    supports_decoding=True,
    decoding_note="the (m, d+1) prefix sums phi(K)^T [V, 1] with the causal form's per-feature running-max "
                  "stabiliser, one token per update: the recurrence the chunked causal form evaluates",
    state_growth="constant",
    grouped_kv="shared",
    grouped_kv_note="one projection for all heads, so phi(K) and the sums phi(K)^T [V, 1] (causal: the prefix sums "
                    "and chunk states; decoding: the state) are per key-value head, read by its query heads' phi(Q); "
                    "the key stabiliser is per group, the query shift per row",
)
class PerformerAttention(Attention):
    """Performer (FAVOR+): positive orthogonal random features approximating softmax attention.

    Random state: ``projection`` (m, d), one matrix shared by all heads, a registered buffer drawn
    from ``seed``. With ``redraw_interval = K > 0`` each block of K training-mode calls uses one
    draw; the call after the K-th redraws from the deterministic generator of
    ``(seed, draw number)`` (see :func:`attentions._random_features.draw_generator`). The call and
    draw counters are buffers too, so a checkpoint resumes the same schedule. ``eval()`` never
    redraws and does not count calls.

    Numerical stabiliser (kept exact): before ``exp`` every key feature ``f`` subtracts its maximum
    ``c_f`` over the real keys, and the query features add ``c_f`` back and then subtract their own
    row maximum. ``c_f`` cancels between the two sides and the row shift between numerator and
    denominator, so the output is the unstabilised estimator up to rounding; the maxima are detached
    (their exact gradient is zero). Unlike one shift per (batch, head) (the paper's code), this
    cannot underflow a key that carries weight when other keys have far larger logits.
    The ``1/sqrt(m)`` factor also cancels and is not applied.

    Padding: padded keys and values are zeroed, excluded from the key max, and their feature rows
    set to zero, so they contribute nothing to ``phi(K)^T V`` or ``phi(K)^T 1``. A sequence with no
    real key outputs zeros.

    Dropout: there is no explicit probability matrix to drop, so ``dropout`` is accepted for a
    uniform interface but not applied.
    """

    def __init__(self, config: PerformerConfig) -> None:
        super().__init__(config)
        generator = draw_generator(config.seed, 0)
        self.register_buffer(
            "projection",
            gaussian_projection(config.num_features, config.head_dim, generator, orthogonal=config.orthogonal),
        )
        self.register_buffer("calls_since_redraw", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_redraws", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Replace ``projection`` by the next deterministic draw (normally called by the schedule)."""
        cfg = self.config
        self.num_redraws += 1
        fresh = gaussian_projection(cfg.num_features, cfg.head_dim, draw_generator(cfg.seed, int(self.num_redraws)),
                                    orthogonal=cfg.orthogonal)
        self.projection.copy_(fresh)
        self.calls_since_redraw.zero_()

    def _maybe_redraw(self) -> None:
        interval = self.config.redraw_interval
        if not (self.training and interval > 0):
            return
        if int(self.calls_since_redraw) >= interval:
            self.redraw_features()
        self.calls_since_redraw += 1

    def feature_maps(
        self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stabilised ``(phi(Q), phi(K))``, each ``(batch, heads, seq, m)``; padded key rows are zero.

        Each is the paper's feature map up to positive factors that the attention's normalisation
        cancels: ``phi(Q)`` times ``exp(c_f - M_i)`` (per feature and query row), ``phi(K)`` times
        ``exp(-c_f)`` (per feature), ``c_f`` the feature's maximum log-feature over the real keys.
        """
        compute = torch.promote_types(q.dtype, torch.float32)  # exp in half precision overflows
        q, k = q.to(compute), k.to(compute)
        k = zero_padded_values(k, key_padding_mask)  # padded contents never reach exp (no inf*0)
        scale = q.shape[-1] ** -0.25
        w = self.projection.to(compute) * scale  # fold the d^-1/4 input scaling into W (m x d, cheap)
        q_proj = torch.matmul(q, w.T)  # w.x for x = q d^-1/4
        k_proj = torch.matmul(k, w.T)
        pad = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]
        # The n x m tensors dominate time and memory, so they are updated in place where autograd
        # allows (matmul saves its inputs, not its output): one pass per step.
        if self.config.kernel == "relu":
            phi_q = torch.relu(q_proj) + RELU_KERNEL_EPS  # relu saves its output: no in-place here
            phi_k = torch.relu(k_proj) + RELU_KERNEL_EPS
            if pad is not None:
                phi_k = phi_k.masked_fill(pad, 0.0)
            return phi_q, phi_k
        # Keys: log phi(y)_f = w_f.y - |y|^2/2, shifted per feature f by its maximum c_f over the
        # real keys; the factor exp(c_f) is moved to the query side. Every key feature is then
        # <= 1 and each feature's top key is exactly 1, so no key underflows merely because
        # another key (or feature) is far larger: a shift shared by all features would drop
        # keys that matter (the issue-11 collapse at large logits).
        half_sq_norm = (k * scale).square().sum(-1, keepdim=True) / 2  # (b, h, n, 1)
        k_log = k_proj.sub_(half_sq_norm)
        if pad is not None:
            k_log = k_log.masked_fill_(pad, float("-inf"))  # exp(-inf) = 0: padded rows vanish exactly
        key_max = torch.nan_to_num(k_log.detach().amax(dim=-2, keepdim=True), neginf=0.0)  # (b, h, 1, m)
        phi_k = torch.exp(k_log.sub_(key_max))
        # Queries: log phi(x)_f + c_f, shifted by its own row maximum. The |x|^2/2 term is constant
        # along a row and cancels with that shift, so it is never formed. The row shift cancels in
        # the ratio and c_f cancels against the keys' shift: the output is the unstabilised estimator
        # up to rounding. Each product phi_q phi_k is exp(its log-term - the row's largest log-term),
        # so the denominator is >= 1 and only terms negligible next to the largest underflow.
        q_log = q_proj.add_(key_max)
        phi_q = torch.exp(q_log.sub_(q_log.detach().amax(dim=-1, keepdim=True)))
        return phi_q, phi_k

    def attend(self, q, k, v, key_padding_mask):
        self._maybe_redraw()
        if self.config.kv_groups > 1:  # the group's query heads on the head axis, key-value heads on the batch axis
            return ungroup_heads(self._attend(*group_heads(q, k, v, key_padding_mask)), q.shape[0])
        return self._attend(q, k, v, key_padding_mask)

    def _attend(self, q, k, v, key_padding_mask):
        """FAVOR+ of q ``(B, h, n, d)`` and k, v ``(B, h, n, d)`` or ``(B, 1, n, d)`` (one key-value head for the
        ``h`` query heads; :func:`attentions._lean_linear.group_heads`): every path broadcasts over the head axis."""
        if self.config.recompute:
            compute = torch.promote_types(q.dtype, torch.float32)
            w = self.projection.to(compute) * q.shape[-1] ** -0.25  # the d^-1/4 input scaling folded into W
            fmap = _FavorMap(w, q.shape[-1] ** -0.25) if self.config.kernel == "softmax" else _ReluMap(w)
            return lean_linear_attention(fmap, q, k, v, key_padding_mask, causal=self.config.causal)
        if self.config.causal:
            return self._causal_attend(q, k, v, key_padding_mask)
        phi_q, phi_k = self.feature_maps(q, k, key_padding_mask)
        return linear_attention(phi_q, phi_k, v, key_padding_mask)

    def _causal_attend(self, q, k, v, key_padding_mask):
        """Causal FAVOR+ by chunked prefix sums (see the module docstring)."""
        if self.config.kernel == "relu":
            phi_q, phi_k = self.feature_maps(q, k, key_padding_mask)  # bounded features: no stabiliser needed
            return causal_linear_attention(phi_q, phi_k, v, key_padding_mask)
        compute = torch.promote_types(q.dtype, torch.float32)
        q, k = q.to(compute), k.to(compute)
        k = zero_padded_values(k, key_padding_mask)  # padded contents never reach exp (no inf*0)
        scale = q.shape[-1] ** -0.25
        w = self.projection.to(compute) * scale
        # log phi(x)_f = w_f.x - |x|^2/2 up to the 1/sqrt(m) factor; the query's |x|^2/2 is constant
        # along its row and cancels in the ratio, so it is left out.
        log_q = torch.matmul(q, w.T)
        log_k = torch.matmul(k, w.T).sub_((k * scale).square().sum(-1, keepdim=True) / 2)
        if key_padding_mask is not None:
            log_k = log_k.masked_fill(~key_padding_mask[:, None, :, None], float("-inf"))
        return causal_exp_linear_attention(log_q, log_k, v, key_padding_mask)

    # ------------------------------------------------------------------------------------------- decoding
    # Why a step equals the causal forward: the causal form (either path) is out_i = phi(q_i)^T S_i / phi(q_i)^T
    # z_i with S_i, z_i the sums over keys j <= i, computed chunk by chunk with a per-feature running maximum of the
    # key log-features as the reference of phi(K). The state is those sums after the prefix and that reference;
    # a step adds one key (raising the reference to max(T, log phi(k)) and rescaling the sums by exp(T - T') first,
    # as the causal form does when a chunk raises it) and reads the sums with the query's features relative to the
    # same reference. The references cancel between keys and queries, so the output is the same estimator up to
    # float rounding (attentions._lean_linear, "decoding"). The projection is the module's buffer: eval() (or
    # redraw_interval 0) keeps it fixed between prefill and steps; a redraw in between would change the kernel.

    def _decode_map(self, dtype: torch.dtype) -> FeatureMap:
        w = self.projection.to(dtype) * self.config.head_dim ** -0.25  # the d^-1/4 input scaling folded into W
        return _FavorMap(w, self.config.head_dim ** -0.25) if self.config.kernel == "softmax" else _ReluMap(w)

    def new_state(self, batch, max_len, dtype, device):
        exp = self.config.kernel == "softmax"
        # One state per key-value head (grouped_kv='shared'): the hooks get k, v with kv_heads heads.
        return FeatureSumState(batch, max_len, self.config.kv_heads, self.config.num_features, self.config.head_dim,
                               torch.promote_types(dtype, torch.float32), device, exp)

    def prefill_state(self, q, k, v, key_padding_mask, state):
        state.sums, reference = prefix_sums(self._decode_map(state.sums.dtype), key_padding_mask, k, v, (),
                                            state.sums.dtype)
        if reference is not None:
            state.reference = reference
        return self.attend(q, k, v, key_padding_mask) if q.shape[2] else q.new_zeros(q.shape)

    def step_state(self, q, k, v, state):
        fmap = self._decode_map(state.sums.dtype)
        reference = step_sums(fmap, state.sums, state.reference, k, v, ())
        if reference is not None:
            state.reference = reference
        return query_sums(fmap, state.sums, reference, q, None, ())


class _FavorMap(FeatureMap):
    """FAVOR+ log-features for the recomputing path: ``w.x`` (queries; the row's ``|x|^2/2`` cancels with
    the row shift) and ``w.y - |y|^2/2`` (keys), ``w`` the (m, d) projection with the ``d^-1/4`` folded
    in, ``scale = d^-1/4`` (``|y|^2/2`` is taken as ``|scale y|^2 / 2``, the stored path's rounding). The
    engine applies the stabilisers."""

    exp = True

    def __init__(self, w: torch.Tensor, scale: float) -> None:
        self.w, self.scale = w, scale

    def num_features(self) -> int:
        return self.w.shape[0]

    def project(self, x, side, params):
        t = torch.matmul(x, self.w.to(x.dtype).T)
        if side == "k":
            t.sub_((x * self.scale).square_().sum(-1, keepdim=True).div_(2))
        return t

    def project_backward(self, x, t, grad_t, side, params, param_grads):
        grad_x = torch.matmul(grad_t, self.w.to(x.dtype))
        if side == "k":  # d(|scale y|^2 / 2)/dy = scale^2 y
            grad_x.sub_(grad_t.sum(-1, keepdim=True).mul_(self.scale ** 2) * x)
        return grad_x


class _ReluMap(FeatureMap):
    """The generalized ReLU kernel ``relu(w.x) + eps`` for the recomputing path (same on both sides)."""

    exp = False

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def num_features(self) -> int:
        return self.w.shape[0]

    def project(self, x, side, params):
        return torch.relu(torch.matmul(x, self.w.to(x.dtype).T)).add_(RELU_KERNEL_EPS)

    def project_backward(self, x, t, grad_t, side, params, param_grads):
        # relu's gradient from the sign of w.x, recomputed (t - eps rounds tiny positives to 0).
        w = self.w.to(x.dtype)
        return torch.matmul(grad_t.masked_fill(torch.matmul(x, w.T) <= 0, 0.0), w)
