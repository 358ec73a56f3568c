"""Base class of every mechanism: the call contract and its input checks.

Contract (see docs/DESIGN.md)::

    out = attn(q, k, v, key_padding_mask=mask)

``q, k, v``: float tensors ``(batch, heads, seq, head_dim)``, already projected.
``key_padding_mask``: bool ``(batch, seq)``, ``True`` = real token, or ``None``.
Returns ``(batch, heads, seq, head_dim)``. Padded query rows may hold anything finite;
real rows, and the gradients of real inputs, must not depend on what stands in padded
positions, NaN and +-inf included. :meth:`Attention.forward` guarantees the latter for every
mechanism: it replaces padded q, k, v by zeros before :meth:`Attention.attend` sees them.

With ``causal=True`` (mechanisms whose info says ``supports_causal``) the output at position ``i``
depends on the inputs at positions ``<= i`` only: its value equals the output of the prefix ending at
``i`` and its gradient with respect to every later input is exactly zero. Key padding still applies
(a decoder pads on the right, so a real query never meets a padded key before it).
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import zero_padded_values
from .registry import AttentionConfig, check_causal

LAYOUT = "(batch, heads, seq, head_dim)"
REDUCED_PRECISION = (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    """Subclasses implement :meth:`attend`; :meth:`forward` checks the inputs first."""

    name: str = "?"

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        check_causal(self.name, config.causal)  # also when a config is built by hand, not via make_config
        self.config = config

    @property
    def causal(self) -> bool:
        """Whether query ``i`` attends only to keys ``j <= i`` (the config's ``causal``)."""
        return self.config.causal

    @property
    def backend(self) -> str:
        """Which implementation ran last (recorded by the benchmark and the results)."""
        return "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key_padding_mask = self.check_inputs(q, k, v, key_padding_mask)
        if key_padding_mask is not None:
            # Replace (never multiply: 0 * nan is nan) whatever stands in padded slots, so that a
            # NaN or inf there cannot reach a real row through a masked score, a 0-weighted value,
            # a softmax backward (0 * nan in rowsum(dO * O)) or a k-means centroid.
            q, k, v = (zero_padded_values(t, key_padding_mask) for t in (q, k, v))
        compute = self.compute_dtype(q)
        if compute is None:
            return self.attend(q, k, v, key_padding_mask)
        # Reduced precision: scores, softmax and normalisers in float32 (SDPA's policy), the
        # result handed back in the input dtype. Autocast is off inside, or it would send the
        # matmuls back to bf16.
        with torch.autocast(q.device.type, enabled=False):
            out = self.attend(q.to(compute), k.to(compute), v.to(compute), key_padding_mask)
        return out.to(q.dtype)

    def compute_dtype(self, q: torch.Tensor) -> torch.dtype | None:
        """The dtype :meth:`attend` computes in, or None to run it on the inputs as given.

        float16/bfloat16 inputs, or any input under a reduced-precision autocast, are computed in
        float32: rounding scores to 8 (bf16) or 11 (fp16) bits moves a softmax by far more than
        the inputs' own rounding (issue 11). Mechanisms whose kernels already accumulate in
        float32 (fused SDPA) override this.
        """
        if q.dtype in REDUCED_PRECISION or torch.is_autocast_enabled(q.device.type):
            return torch.promote_types(q.dtype, torch.float32)
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Validate the contract; returns the mask, or None when every token is real."""
        cfg = self.config
        for label, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.name}: {label} must be a tensor {LAYOUT}, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{self.name}: {label} must be 4-D {LAYOUT}, got shape {tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise ValueError(f"{self.name}: {label} must be a float tensor {LAYOUT}, got dtype {t.dtype}")
        if not (q.shape == k.shape == v.shape):
            raise ValueError(
                f"{self.name}: q, k, v must share the shape {LAYOUT}, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"{self.name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        batch, heads, seq, head_dim = q.shape
        if heads != cfg.num_heads or head_dim != cfg.head_dim:
            raise ValueError(
                f"{self.name}: expected {LAYOUT} with heads={cfg.num_heads}, head_dim={cfg.head_dim}; "
                f"got shape {tuple(q.shape)}"
            )
        if seq == 0:
            raise ValueError(f"{self.name}: seq must be >= 1 in {LAYOUT}")
        if cfg.max_seq_len is not None and seq > cfg.max_seq_len:
            raise ValueError(
                f"{self.name}: sequence length {seq} exceeds max_seq_len={cfg.max_seq_len}"
            )
        if key_padding_mask is None:
            return None
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq):
            raise ValueError(
                f"{self.name}: key_padding_mask must be bool (batch, seq) = ({batch}, {seq}) with True = "
                f"real token; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"{self.name}: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        return None if bool(key_padding_mask.all()) else key_padding_mask

    def extra_repr(self) -> str:
        return repr(self.config)
