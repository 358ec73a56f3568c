"""Random-feature helpers shared by the kernel mechanisms (``performer``, ``rfa``).

Random projection matrices, and the linear-time attention both compute from their features.

Everything here draws from an explicit ``torch.Generator`` so a mechanism's random state is a
function of its seed, never of the global RNG.
"""

from __future__ import annotations

import torch

from .functional import zero_padded_values

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: spreads (seed, draw) pairs apart
_MASK63 = (1 << 63) - 1


def draw_generator(seed: int, draw: int) -> torch.Generator:
    """Generator for the ``draw``-th random draw of a module built with ``seed``.

    Draw 0 is the construction-time draw; a feature redraw ``r`` uses draw ``r``. Deriving the
    state from ``(seed, draw)`` makes redraws deterministic and resumable from a checkpoint that
    stores only the draw counter.
    """
    mixed = seed if draw == 0 else (seed * _MIX + draw * (_MIX >> 1) + draw) & _MASK63
    return torch.Generator().manual_seed(mixed)


def gaussian_projection(
    num_rows: int,
    dim: int,
    generator: torch.Generator,
    orthogonal: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(num_rows, dim)`` matrix whose rows are marginally ``N(0, I_dim)``.

    ``orthogonal=False``: i.i.d. Gaussian rows. ``orthogonal=True``: block-orthogonal rows as in
    FAVOR+ (Choromanski et al. 2021, "ORF"): each block of ``dim`` rows is an exactly orthonormal
    set (QR of a Gaussian matrix with the sign fix that makes it Haar-distributed), the last block
    truncated; every row is then rescaled to the norm of an independent ``N(0, I_dim)`` vector
    (chi(dim)-distributed, the "norm correction"), so each row keeps the Gaussian marginal and the
    estimator stays unbiased while rows within a block are orthogonal (lower variance).
    Drawn in float64 on the CPU for reproducibility, returned as ``dtype``.
    """
    if num_rows < 1 or dim < 1:
        raise ValueError(f"gaussian_projection needs num_rows >= 1 and dim >= 1, got {num_rows}, {dim}")
    if not orthogonal:
        return torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).to(dtype)
    blocks = []
    for _ in range((num_rows + dim - 1) // dim):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        # Without the sign fix QR's output is not Haar-uniform.
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)[None, :]
        blocks.append(q.T)  # rows orthonormal
    rows = torch.cat(blocks, dim=0)[:num_rows]
    norms = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(dtype)


def linear_attention(
    phi_q: torch.Tensor | tuple[torch.Tensor, ...],
    phi_k: torch.Tensor | tuple[torch.Tensor, ...],
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    min_denominator: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1))`` without forming the ``n x n`` matrix.

    ``phi_q``/``phi_k``: ``(batch, heads, seq, m)`` features, or matching tuples of feature
    blocks whose concatenation along the last axis is the feature map (saves the copy a
    concatenation would cost). Padded keys are dropped by zeroing their value rows, ones column
    included, so ``phi_k`` only needs to be finite there. The denominator is
    clamped from below at ``min_denominator`` (default: the smallest positive normal of the compute
    dtype, which only guards the 0/0 of a sequence without real keys). Returns ``v``'s dtype.
    """
    q_parts = phi_q if isinstance(phi_q, tuple) else (phi_q,)
    k_parts = phi_k if isinstance(phi_k, tuple) else (phi_k,)
    # A ones column so one matmul gives both phi(K)^T V and phi(K)^T 1.
    values = _with_ones(v, key_padding_mask, q_parts[0].dtype)
    out = None
    for fq, fk in zip(q_parts, k_parts, strict=True):
        part = torch.matmul(fq, torch.matmul(fk.transpose(-2, -1), values))  # via (b, h, m, d + 1)
        out = part if out is None else out + part
    return _ratio(out, min_denominator, v.dtype)


# ----------------------------------------------------------------------------- causal (prefix sums)

# Tokens per chunk of the causal prefix sums. Within a chunk the (C, C) masked matrix phi(Q) phi(K)^T
# is formed (O(n C) memory); across chunks a running (m, d + 1) state is carried, one per chunk
# (O(n m d / C) memory). C >= d + 1 keeps the states below the n x m features.
CAUSAL_CHUNK = 64
# Largest excess (in nats) of a row's shared exponent over its true largest log-term that float32
# tolerates (see causal_exp_linear_attention); beyond it the prefix sums are computed in float64.
FP32_EXCESS = 60.0


def _chunked(x: torch.Tensor, chunk: int, fill: float = 0.0) -> torch.Tensor:
    """``(b, h, n, e)`` -> ``(b, h, n_chunks, chunk, e)``, the tail filled with ``fill``."""
    n = x.shape[-2]
    pad = -(-n // chunk) * chunk - n
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill)
    return x.view(*x.shape[:2], -1, chunk, x.shape[-1])


def _causal_chunk_sums(phi_q: tuple[torch.Tensor, ...], phi_k: tuple[torch.Tensor, ...], values: torch.Tensor,
                       decay: torch.Tensor | None) -> torch.Tensor:
    """``sum_{j <= i} (phi(q_i) . phi(k_j)) values_j`` for chunked ``(b, h, chunks, C, .)`` inputs.

    ``phi_q``/``phi_k``: matching tuples of feature blocks (their concatenation is the feature map).
    Inside a chunk: the lower-triangular ``(C, C)`` product. Across chunks: the state
    ``S_c = sum_{j before chunk c} phi(k_j) values_j^T`` (an exclusive cumulative sum of per-chunk
    ``(m, e)`` sums), so no ``(n, m, e)`` tensor of per-token outer products is ever formed.
    ``decay`` ``(b, h, chunks, m)`` (or None for 1): the state entering chunk ``c`` is multiplied by
    ``decay[c]`` per feature (the change of reference of stabilised features).
    """
    chunk = values.shape[-2]
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=values.device).tril()
    scores = None
    out = None
    for fq, fk in zip(phi_q, phi_k, strict=True):
        kv = torch.matmul(fk.transpose(-1, -2), values)  # (b, h, chunks, m, e)
        if decay is None:
            state = torch.nn.functional.pad(kv[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))
        else:
            # unbind (not indexing in the loop): its backward is one stack, not a zero-filled
            # full-size gradient per chunk.
            kvs, decays = kv.unbind(dim=2), decay[..., None].unbind(dim=2)
            states = [torch.zeros_like(kvs[0])]
            for c in range(1, len(kvs)):
                states.append(decays[c] * (states[-1] + kvs[c - 1]))
            state = torch.stack(states, dim=2)
        part = torch.matmul(fq, state)
        out = part if out is None else out + part
        s = torch.matmul(fq, fk.transpose(-1, -2))
        scores = s if scores is None else scores + s
    return out + torch.matmul(scores.masked_fill_(~tril, 0.0), values)


def _with_ones(v: torch.Tensor, key_padding_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``[v, 1]`` with padded rows zeroed (ones column included): one product gives numerator and denominator."""
    values = zero_padded_values(v, key_padding_mask).to(dtype)
    if key_padding_mask is None:
        ones = values.new_ones(values.shape[:-1] + (1,))
    else:
        ones = key_padding_mask[:, None, :, None].expand(values.shape[:-1] + (1,)).to(dtype)
    return torch.cat([values, ones], dim=-1)


def _ratio(sums: torch.Tensor, min_denominator, dtype: torch.dtype) -> torch.Tensor:
    """``[numerator, denominator]`` sums ``(..., d + 1)`` -> ``numerator / max(denominator, floor)`` as ``dtype``.

    ``min_denominator``: a float, a broadcastable tensor, or None for the smallest positive normal.
    """
    numerator, denominator = sums[..., :-1], sums[..., -1:]
    if min_denominator is None:
        min_denominator = torch.finfo(sums.dtype).tiny
    if isinstance(min_denominator, torch.Tensor):
        denominator = torch.maximum(denominator, min_denominator.to(sums.dtype))
    else:
        denominator = denominator.clamp_min(min_denominator)
    return (numerator / denominator).to(dtype)


def causal_linear_attention(
    phi_q: torch.Tensor | tuple[torch.Tensor, ...],
    phi_k: torch.Tensor | tuple[torch.Tensor, ...],
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    min_denominator: torch.Tensor | float | None = None,
    chunk: int = CAUSAL_CHUNK,
) -> torch.Tensor:
    """Causal linear attention: ``out_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / sum_{j<=i} phi(q_i).phi(k_j)``.

    The prefix sums of Katharopoulos et al. 2020 ("Transformers are RNNs", eq. 9), computed chunk by
    chunk (see :func:`_causal_chunk_sums`): time ``O(n m d + n C (m + d))``, memory ``O(n m + n C +
    n m d / C)``, never the ``O(n m d)`` of a cumulative sum of outer products. For bounded features
    (RFA's sin/cos, the ReLU kernel); ``phi_q``/``phi_k`` ``(batch, heads, seq, m)`` or matching tuples
    of feature blocks (as in :func:`linear_attention`), padded key rows need only be finite.
    ``min_denominator``: a float, or a tensor broadcastable to ``(batch, heads, seq, 1)`` (a per-row
    floor such as one proportional to the prefix length). Returns ``v``'s dtype.
    """
    q_parts = phi_q if isinstance(phi_q, tuple) else (phi_q,)
    k_parts = phi_k if isinstance(phi_k, tuple) else (phi_k,)
    n = q_parts[0].shape[-2]
    chunk = min(chunk, n)
    values = _chunked(_with_ones(v, key_padding_mask, q_parts[0].dtype), chunk)
    if key_padding_mask is not None:
        k_parts = tuple(f.masked_fill(~key_padding_mask[:, None, :, None], 0.0) for f in k_parts)
    sums = _causal_chunk_sums(tuple(_chunked(f, chunk) for f in q_parts), tuple(_chunked(f, chunk) for f in k_parts),
                              values, None)
    return _ratio(sums.flatten(2, 3)[:, :, :n], min_denominator, v.dtype)


def causal_exp_linear_attention(
    log_q: torch.Tensor,
    log_k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    chunk: int = CAUSAL_CHUNK,
) -> torch.Tensor:
    """Causal linear attention with positive features given by their logarithms (Performer's FAVOR+).

    ``phi(q_i)_f = exp(log_q[i, f])``, ``phi(k_j)_f = exp(log_k[j, f])`` up to any factor per query row
    (it cancels in the ratio); ``log_k`` is ``-inf`` on padded keys. ``(batch, heads, seq, m)`` each.

    Stabilisation, exact up to rounding: in chunk ``c`` the key features are ``exp(log_k - T_c)``
    with ``T_c[f]`` the running maximum of ``log_k[:, f]`` up to the end of chunk ``c`` (so <= 1), the
    carried state is rescaled by ``exp(T_{c-1} - T_c) <= 1`` when entering chunk ``c``, and query
    ``i`` uses ``exp(log_q[i] + T_c - N_i)`` with ``N_i`` its row maximum (so <= 1). Every product is
    then ``exp(true log-term - N_i)``: no overflow, and the row's largest term is ``exp(M_i - N_i)``
    with ``M_i`` the true largest log-term over ``j <= i``. ``N_i - M_i`` is positive only when a later
    key of the same chunk dominates a feature; up to ``FP32_EXCESS`` nats float32 holds every term
    that matters, beyond it (keys of wildly different norms in one chunk) the sums run in float64
    (the check uses a lower bound of ``M_i``, so it errs towards float64). The references
    are detached: their exact gradient is zero, so outputs get no gradient from later inputs.
    """
    n = log_q.shape[-2]
    chunk = min(chunk, n)
    with torch.no_grad():
        chunk_max = _chunked(log_k.detach(), chunk, float("-inf")).amax(dim=-2)  # (b, h, chunks, m)
        running = chunk_max.cummax(dim=2).values  # T_c, -inf until the first real key
        reference = torch.nan_to_num(running, neginf=0.0)
        previous = torch.nn.functional.pad(running[:, :, :-1], (0, 0, 1, 0), value=float("-inf"))
        decay = torch.where(torch.isfinite(previous), torch.exp(previous - reference), torch.zeros_like(reference))
        lq = _chunked(log_q.detach(), chunk)
        row_shift = (lq + reference[:, :, :, None]).amax(dim=-1, keepdim=True)  # N_i
        # M_i >= max_f (log_q[i, f] + max(log_k[i, f], T_{c-1}[f])): the row's own key and the earlier
        # chunks are in its prefix. A lower bound, so the excess is over- (never under-) estimated.
        seen = torch.maximum(_chunked(log_k.detach(), chunk, float("-inf")), previous[:, :, :, None])
        true_max = (lq + seen).amax(dim=-1, keepdim=True)
        del seen
        excess = (row_shift - true_max).nan_to_num(nan=0.0, neginf=0.0, posinf=0.0)
        wide = bool(excess.amax() > FP32_EXCESS)
    compute = torch.float64 if wide else log_q.dtype
    phi_q = torch.exp((_chunked(log_q, chunk) - row_shift + reference[:, :, :, None]).to(compute))
    phi_k = torch.exp((_chunked(log_k, chunk, float("-inf")) - reference[:, :, :, None]).to(compute))
    values = _chunked(_with_ones(v, key_padding_mask, compute), chunk)
    sums = _causal_chunk_sums((phi_q,), (phi_k,), values, decay.to(compute))
    return _ratio(sums.flatten(2, 3)[:, :, :n], None, v.dtype)
