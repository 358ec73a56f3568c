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
    compute = q_parts[0].dtype
    values = zero_padded_values(v, key_padding_mask).to(compute)
    # Append a ones column so one matmul gives both phi(K)^T V and phi(K)^T 1.
    if key_padding_mask is None:
        ones = values.new_ones(values.shape[:-1] + (1,))
    else:
        ones = key_padding_mask[:, None, :, None].expand(values.shape[:-1] + (1,)).to(compute)
    values = torch.cat([values, ones], dim=-1)
    out = None
    for fq, fk in zip(q_parts, k_parts, strict=True):
        part = torch.matmul(fq, torch.matmul(fk.transpose(-2, -1), values))  # via (b, h, m, d + 1)
        out = part if out is None else out + part
    numerator, denominator = out[..., :-1], out[..., -1:]
    if min_denominator is None:
        min_denominator = torch.finfo(compute).tiny
    if isinstance(min_denominator, torch.Tensor):
        denominator = torch.maximum(denominator, min_denominator.to(compute))
    else:
        denominator = denominator.clamp_min(min_denominator)
    return (numerator / denominator).to(v.dtype)
