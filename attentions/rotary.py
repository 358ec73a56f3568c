"""Rotary position embeddings, RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864): the rotation alone.

A head vector ``x`` of even size ``d`` at position ``p`` is rotated pair by pair: pair ``i`` (``i = 0 .. d/2 - 1``)
turns by the angle ``p theta_i``, ``theta_i = base^(-2i/d)``, ``base = 10000`` (the paper's eq. 15). Rotations of one
pair compose, so ``(R_m q)^T (R_n k) = q^T R_(n-m) k`` (eq. 16): the score of a rotated query and a rotated key
depends on their positions only through the offset ``n - m``, and every position has its rotation, so a longer
context needs no table.

Layout: the paper's interleaved pairs (eq. 34), pair ``i`` = ``(x_(2i), x_(2i+1))``::

    out_(2i)   = x_(2i) cos(p theta_i) - x_(2i+1) sin(p theta_i)
    out_(2i+1) = x_(2i+1) cos(p theta_i) + x_(2i) sin(p theta_i)

computed as one complex product per pair, ``(x_(2i) + i x_(2i+1)) e^(i p theta_i)`` (the form of Meta's Llama code).
The half-split layout of GPT-NeoX and Hugging Face's Llama ("rotate_half", pair ``(x_i, x_(i + d/2))``) differs from
it by one fixed permutation of the head's dimensions, which the learned projections absorb: the same dot products and
the same relative property. Interleaved is chosen for speed: adjacent pairs view as complex numbers, so the rotation is
one elementwise complex multiplication forward and one backward, where the half split takes two slices, four
products, two sums and a concatenation (in the quick/mqar_causal backbone, forward+backward, one CPU thread: +2% to
+5% over sinusoidal positions, against +9% to +14% for the half split; docs/POSITIONS.md).

Precision: the angles are formed in float64 from integer positions (float32 on a device without float64, MPS), and
``e^(i p theta)`` is rounded once to the compute dtype: float32, or the input's dtype where it is wider. The rotation
is done in that dtype (bf16 and fp16 vectors are rotated in float32) and returned in the input's dtype, so a
position's rotation is as accurate at 10^6 as at 10.

Pure functions; nothing is cached (the backbone computes the table once per forward and hands it to every layer).
Owns: the rotation. Imports: torch only.
"""

from __future__ import annotations

import torch

BASE = 10000.0
# The complex dtype of each real compute dtype (compute_dtype gives float32 or float64)
COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def check_head_dim(head_dim: int) -> None:
    """ValueError unless ``head_dim`` is an even int >= 2 (RoPE rotates pairs of dimensions)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary position embeddings rotate pairs of dimensions: head_dim must be an even int >= 2, "
                         f"got {head_dim!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype a rotation of ``dtype`` vectors is computed in: float32, or ``dtype`` where it is wider."""
    return torch.promote_types(dtype, torch.float32)


def rotary_frequencies(head_dim: int, base: float = BASE, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``theta_i = base^(-2i/d)`` for ``i = 0 .. d/2 - 1``: (head_dim // 2,) radians per position (RoFormer eq. 15).
    ValueError for an odd ``head_dim`` or a ``base`` that is not > 1."""
    check_head_dim(head_dim)
    if not base > 1.0:
        raise ValueError(f"rotary base must be > 1, got {base!r}")
    exponents = torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim
    return torch.pow(torch.tensor(float(base), dtype=dtype, device=device), -exponents)


def rotary_table(positions: torch.Tensor, head_dim: int, dtype: torch.dtype = torch.float32,
                 base: float = BASE) -> torch.Tensor:
    """The rotation of each position: ``e^(i p theta_j) = cos(p theta_j) + i sin(p theta_j)``, complex, shape
    ``positions.shape + (head_dim // 2,)``, on the positions' device, complex of :func:`compute_dtype` of ``dtype``
    (complex64 for float32, bf16 and fp16; complex128 for float64).

    ``positions``: an integer tensor of any shape, shaped so that the table broadcasts against the ``(batch, heads,
    seq)`` of the vectors to rotate: ``(seq,)`` for one position per column, ``(batch, 1, 1)`` for one position per
    sequence (a decoding step). The angles are formed in float64 (float32 on MPS, which has none), so large positions
    keep their accuracy. ValueError for a float, complex or bool ``positions`` or an odd ``head_dim``.
    """
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"rotary positions must be an integer tensor, got {got}")
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    angles = positions.to(wide)[..., None] * rotary_frequencies(head_dim, base, wide, positions.device)
    real = compute_dtype(dtype)
    return torch.complex(angles.cos().to(real), angles.sin().to(real))


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``x`` (..., d) with each interleaved pair ``(x_(2i), x_(2i+1))`` rotated by ``table`` (..., d/2) from
    :func:`rotary_table`, broadcastable against ``x``'s pairs: ``(x_(2i) + i x_(2i+1)) table_i``. Computed in the
    table's precision (or ``x``'s where it is wider), returned in ``x``'s dtype; autograd flows through it (the
    backward is the product with the conjugate). ValueError when ``x`` has an odd size or the table is not complex
    with ``d / 2`` columns."""
    d = x.shape[-1]
    if d % 2 or not table.is_complex() or table.shape[-1] != d // 2:
        raise ValueError(f"apply_rotary: x has {d} dimensions, the table is {table.dtype} with {table.shape[-1]} "
                         "columns; an even d and a complex table of d / 2 columns (rotary_table) are needed")
    real = compute_dtype(torch.promote_types(x.dtype, table.real.dtype))
    pairs = x.to(real).unflatten(-1, (d // 2, 2))
    if not _complex_viewable(pairs):
        pairs = pairs.contiguous()
    turned = torch.view_as_complex(pairs) * table.to(COMPLEX[real])
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = BASE) -> torch.Tensor:
    """``x`` (..., seq, d) with the vector at each position rotated by RoPE: :func:`apply_rotary` with the table of
    ``positions`` (broadcastable against ``x.shape[:-1]``), in :func:`compute_dtype` of ``x``."""
    return apply_rotary(x, rotary_table(positions, x.shape[-1], x.dtype, base))


def _complex_viewable(pairs: torch.Tensor) -> bool:
    """Whether ``torch.view_as_complex`` can view ``pairs`` (..., 2) in place: unit last stride, even other strides
    and offset (the projections' q and k, even strided views of them, always are)."""
    return pairs.stride(-1) == 1 and pairs.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in pairs.stride()[:-1])
