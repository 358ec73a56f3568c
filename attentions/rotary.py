"""Rotary position embeddings, RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864): the rotation alone.

A head vector ``x`` of even size ``d`` at position ``p`` is rotated pair by pair: pair ``i`` (``i = 0 .. d/2 - 1``)
turns by the angle ``p theta_i``, ``theta_i = base^(-2i/d)``, ``base = 10000`` (the paper's eq. 15). Because the
rotations of one pair compose, ``(R_m q)^T (R_n k) = q^T R_(n-m) k`` (eq. 16): a score between a rotated query and a
rotated key depends on their positions only through the offset ``n - m``, and any position has its rotation, so a
longer context needs no table.

Layout: the half-split pairs of GPT-NeoX and Llama ("rotate_half"), pair ``i`` = ``(x_i, x_(i + d/2))``::

    out_i         = x_i cos(p theta_i) - x_(i + d/2) sin(p theta_i)
    out_(i + d/2) = x_(i + d/2) cos(p theta_i) + x_i sin(p theta_i)

The paper's efficient form (eq. 34) rotates the interleaved pairs ``(x_(2i), x_(2i+1))`` by the same angles. The two
differ by one fixed permutation of the head's dimensions, which the learned projections absorb: the same dot
products and the same relative property. The half split is chosen because its pairs are two contiguous halves (two
slices and one concatenation, no strided gather) and because it is the layout of the Llama and NeoX checkpoints.

Precision: the angles are formed in float64 from integer positions (float32 where a device has no float64), their
cos and sin are rounded once to the compute dtype, float32 or the input's dtype if wider, and the rotation is done in
that dtype and returned in the input's: a position's rotation is as accurate at 10^6 as at 10.

Pure functions; nothing is cached (the backbone computes the tables once per forward and hands them to every layer).
Owns: the rotation. Imports: torch only.
"""

from __future__ import annotations

import torch

BASE = 10000.0


def check_head_dim(head_dim: int) -> None:
    """ValueError unless ``head_dim`` is an even int >= 2 (RoPE rotates pairs of dimensions)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary position embeddings rotate pairs of dimensions: head_dim must be an even int >= 2, "
                         f"got {head_dim!r}")


def rotary_frequencies(head_dim: int, base: float = BASE, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``theta_i = base^(-2i/d)`` for ``i = 0 .. d/2 - 1``: (head_dim // 2,) radians per position (RoFormer eq. 15).
    ValueError for an odd ``head_dim`` or a ``base`` that is not > 1."""
    check_head_dim(head_dim)
    if not base > 1.0:
        raise ValueError(f"rotary base must be > 1, got {base!r}")
    exponents = torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim
    return torch.pow(torch.tensor(float(base), dtype=dtype, device=device), -exponents)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32,
                   base: float = BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation's tables: ``cos(p theta_i)`` and ``sin(p theta_i)``, each ``positions.shape + (head_dim // 2,)``
    in ``dtype``, on the positions' device.

    ``positions``: an integer tensor of any shape, shaped so that the tables broadcast against the ``(batch, heads,
    seq)`` of the vectors to rotate: ``(seq,)`` for one position per column, ``(batch, 1, 1)`` for one position per
    sequence (a decoding step). The angles are formed in float64 (float32 on a device without it, MPS), so large
    positions keep their accuracy. ValueError for a float or bool ``positions`` or an odd ``head_dim``.
    """
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"rotary positions must be an integer tensor, got {got}")
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    angles = positions.to(wide)[..., None] * rotary_frequencies(head_dim, base, wide, positions.device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rotation of ``dtype`` vectors is computed in: float32, or ``dtype`` where it is wider."""
    return torch.promote_types(dtype, torch.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (..., d) rotated pair by pair (half-split layout) by the tables of :func:`rotary_cos_sin`, (..., d/2)
    broadcastable against ``x[..., : d/2]``. Computed in ``promote(x.dtype, cos.dtype)`` (tables made in
    :func:`compute_dtype`), returned in ``x``'s dtype. ValueError when the tables do not have ``d / 2`` columns."""
    half = x.shape[-1] // 2
    if x.shape[-1] % 2 or cos.shape[-1] != half or sin.shape[-1] != half:
        raise ValueError(f"apply_rotary: x has {x.shape[-1]} dimensions, the tables {cos.shape[-1]} and "
                         f"{sin.shape[-1]} columns; an even d and d / 2 columns are needed")
    c = torch.promote_types(x.dtype, cos.dtype)
    x1, x2 = x.to(c).split(half, dim=-1)
    cos, sin = cos.to(c), sin.to(c)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = BASE) -> torch.Tensor:
    """``x`` (..., seq, d) with the vector at each position rotated by RoPE: :func:`apply_rotary` with the tables of
    ``positions`` (broadcastable against ``x.shape[:-1]``), computed in :func:`compute_dtype` of ``x``."""
    return apply_rotary(x, *rotary_cos_sin(positions, x.shape[-1], compute_dtype(x.dtype), base))
