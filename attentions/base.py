"""Base class of every mechanism: the call contract and its input checks.

Contract (see docs/DESIGN.md)::

    out = attn(q, k, v, key_padding_mask=mask)

``q, k, v``: float tensors ``(batch, heads, seq, head_dim)``, already projected. With grouped-query attention
(config ``num_kv_heads`` < ``num_heads``) ``k`` and ``v`` have ``num_kv_heads`` heads, key-value head ``j`` serving
the ``g = num_heads / num_kv_heads`` consecutive query heads ``j g ... j g + g - 1``. A mechanism whose info says
``grouped_kv='shared'`` receives them so in :meth:`Attention.attend` and in its decoding hooks (one cache or
summary per key-value head); an ``'expanded'`` one (a plug-in's default) receives each key-value head repeated for
its group, so its contract does not change; a ``'refused'`` one is not built with groups.
``key_padding_mask``: bool ``(batch, seq)``, ``True`` = real token, or ``None``.
Returns ``(batch, heads, seq, head_dim)``. Padded query rows may hold anything finite;
real rows, and the gradients of real inputs, must not depend on what stands in padded
positions, NaN and +-inf included. :meth:`Attention.forward` guarantees the latter for every
mechanism: it replaces padded q, k, v by zeros before :meth:`Attention.attend` sees them.

With ``causal=True`` (mechanisms whose info says ``supports_causal``) the output at position ``i``
depends on the inputs at positions ``<= i`` only: its value equals the output of the prefix ending at
``i`` and its gradient with respect to every later input is exactly zero. Key padding still applies
(a decoder pads on the right, so a real query never meets a padded key before it).

Incremental decoding (causal mechanisms; :mod:`attentions.decoding`)::

    state = attn.init_state(batch, max_len, dtype, device)
    out, state = attn.prefill(q, k, v, state, key_padding_mask=mask)   # the prompt: (batch, heads, n, head_dim), n >= 0
    out_t, state = attn.step(q_t, k_t, v_t, state)                      # one position: (batch, heads, 1, head_dim)

equal, position by position, the causal forward of the whole sequence. A right-padded prompt leaves each sequence
at its own end; each step appends one token to every sequence. A mechanism with a step form overrides
:meth:`Attention.new_state`, :meth:`Attention.prefill_state` and :meth:`Attention.step_state` and says
``supports_decoding=True`` in its info; every other causal mechanism decodes by recomputing its causal forward over
the prefix (:class:`attentions.decoding.RecomputeState`, ``decode_form`` = ``"recompute"``).
"""

from __future__ import annotations

import torch
from torch import nn

from .decoding import DecodeState, RecomputeState, recompute_step
from .functional import is_right_padded, repeat_kv, zero_padded_values
from .registry import AttentionConfig, check_causal, get_attention_info

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
    def info(self):
        """The mechanism's :class:`attentions.AttentionInfo` (registry facts)."""
        return get_attention_info(self.name)

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
            return self.attend_grouped(q, k, v, key_padding_mask)
        # Reduced precision: scores, softmax and normalisers in float32 (SDPA's policy), the
        # result handed back in the input dtype. Autocast is off inside, or it would send the
        # matmuls back to bf16.
        with torch.autocast(q.device.type, enabled=False):
            out = self.attend_grouped(q.to(compute), k.to(compute), v.to(compute), key_padding_mask)
        return out.to(q.dtype)

    def attend_grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`attend` on k, v of ``num_kv_heads`` heads: as they are for a ``grouped_kv='shared'`` mechanism,
        each key-value head repeated for its query heads otherwise (:func:`attentions.functional.repeat_kv`)."""
        groups = self.config.kv_groups
        if groups > 1 and self.info.grouped_kv != "shared":
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return self.attend(q, k, v, key_padding_mask)

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
        self._check_shapes(q, k, v)
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"{self.name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        batch, heads, seq, head_dim = q.shape
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

    def _check_shapes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int | None = None) -> None:
        """q ``(batch, num_heads, seq, head_dim)``, k and v ``(batch, kv_heads, seq, head_dim)``, else ValueError."""
        cfg = self.config
        b, _, seq, _ = q.shape
        want_q = (batch if batch is not None else b, cfg.num_heads, seq, cfg.head_dim)
        want_kv = (want_q[0], cfg.kv_heads, seq, cfg.head_dim)
        if tuple(q.shape) != want_q or tuple(k.shape) != want_kv or tuple(v.shape) != want_kv:
            grouped = f" and k, v num_kv_heads={cfg.kv_heads} heads" if cfg.kv_groups > 1 else ""
            raise ValueError(f"{self.name}: q, k, v must be {LAYOUT} with heads={cfg.num_heads}{grouped}, "
                             f"head_dim={cfg.head_dim}, one batch and seq: expected q {want_q}, k and v {want_kv}; "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")

    # ------------------------------------------------------------------------------------------- decoding

    @property
    def decode_form(self) -> str:
        """``"step"`` where the mechanism has its own step form (info ``supports_decoding``), else ``"recompute"``."""
        return "step" if get_attention_info(self.name).supports_decoding else "recompute"

    def init_state(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> DecodeState:
        """An empty decoding state for ``batch`` sequences of up to ``max_len`` tokens (prompt and generated).

        ``dtype``: the dtype of the q, k, v that will be passed (caches hold it; sums may keep float32).
        Raises ValueError when the mechanism was built without ``causal=True`` (decoding is the causal pattern),
        for ``batch < 1``, ``max_len < 1`` or ``max_len`` above the config's ``max_seq_len``.
        """
        if not self.causal:
            raise ValueError(f"{self.name}: decoding needs the causal form; build it with causal=True")
        for label, value in (("batch", batch), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: init_state's {label} must be an int >= 1, got {value!r}")
        if self.config.max_seq_len is not None and max_len > self.config.max_seq_len:
            raise ValueError(f"{self.name}: init_state's max_len={max_len} exceeds max_seq_len="
                             f"{self.config.max_seq_len}")
        state = self.new_state(batch, max_len, dtype, torch.device(device if device is not None else "cpu"))
        state.mechanism = self.name
        return state

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: DecodeState,
                key_padding_mask: torch.Tensor | None = None, *, x: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, DecodeState]:
        """Feed a prompt ``(batch, heads, n, head_dim)`` (``n >= 0``) into an empty ``state``.

        Returns the causal output for the prompt (padded rows: anything finite) and the state, now at
        ``lengths[b]`` = the real tokens of sequence ``b`` (``key_padding_mask``: bool ``(batch, n)``, right-padded,
        ``True`` = real). ``x`` (the block's input) is reserved for mechanisms whose gates read it; ignored here.
        Raises ValueError for a state that is not empty or not this mechanism's, wrong shapes, a mask that is not
        right-padded, or a prompt longer than the state's ``max_len``.
        """
        self._check_state(state)
        self._check_inference()
        if bool((state.lengths != 0).any()):
            raise ValueError(f"{self.name}: prefill needs an empty state (init_state); this one holds "
                             f"{state.lengths.tolist()} tokens")
        mask = self._check_step_inputs(q, k, v, state, key_padding_mask)
        if mask is not None:
            q, k, v = (zero_padded_values(t, mask) for t in (q, k, v))
        out = self._in_compute_dtype(self.prefill_state, q, *self._hook_kv(k, v), mask, state)
        state.lengths = mask.sum(dim=1) if mask is not None else torch.full_like(state.lengths, q.shape[2])
        return out, state

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: DecodeState, *,
             x: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeState]:
        """One new position per sequence, ``(batch, heads, 1, head_dim)`` each, at position ``state.lengths[b]``.

        Returns the output ``(batch, heads, 1, head_dim)`` and the state advanced by one token. Raises ValueError
        for wrong shapes, a foreign state, or a state already at its ``max_len``.
        """
        self._check_state(state)
        self._check_inference()
        if q.dim() == 4 and q.shape[2] != 1:
            raise ValueError(f"{self.name}: step takes one position, {LAYOUT} with seq=1; got {tuple(q.shape)}")
        if int(state.lengths.max()) + 1 > state.max_len:
            raise ValueError(f"{self.name}: the state is full: a step would exceed its max_len={state.max_len}")
        self._check_step_inputs(q, k, v, state, None)
        out = self._in_compute_dtype(self.step_state, q, *self._hook_kv(k, v), state)
        state.lengths = state.lengths + 1
        return out, state

    def _hook_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v as the decoding hooks take them: grouped (``num_kv_heads`` heads) for a ``grouped_kv='shared'``
        mechanism and for the base class's recompute form (its state stores them grouped); repeated for the query
        heads for an ``'expanded'`` mechanism's own hooks, whose contract does not change."""
        groups = self.config.kv_groups
        recompute = getattr(self.new_state, "__func__", None) is Attention.new_state
        if groups == 1 or recompute or self.info.grouped_kv == "shared":
            return k, v
        return repeat_kv(k, groups), repeat_kv(v, groups)

    # The hooks a step form overrides. They see ``state.lengths`` as it was before the new token(s), and k, v with
    # ``num_kv_heads`` heads where the info says ``grouped_kv='shared'`` (else ``num_heads``).

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> DecodeState:
        """An empty state (checked arguments). Default: the recompute form's prefix of q, k, v (k, v grouped)."""
        cfg = self.config
        return RecomputeState(batch, max_len, cfg.num_heads, cfg.head_dim, dtype, device, kv_heads=cfg.kv_heads)

    def prefill_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                      state: DecodeState) -> torch.Tensor:
        """Fill ``state`` from the prompt (padded slots already zero) and return its causal output."""
        n = q.shape[2]
        state.q[:, :, :n], state.k[:, :, :n], state.v[:, :, :n] = q, k, v
        return self.attend_grouped(q, k, v, key_padding_mask) if n else q.new_zeros(q.shape)

    def step_state(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Add one token per sequence at ``state.lengths`` and return its output. Default: recompute the prefix."""
        return recompute_step(self.attend_grouped, q, k, v, state)

    def _in_compute_dtype(self, hook, q: torch.Tensor, *rest):
        compute = self.compute_dtype(q)
        if compute is None:
            return hook(q, *rest)
        with torch.autocast(q.device.type, enabled=False):
            cast = [t.to(compute) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in rest]
            return hook(q.to(compute), *cast).to(q.dtype)

    def _check_inference(self) -> None:
        # Training mode would apply attention dropout in the prefill (the causal forward) and not in the steps:
        # the two would disagree silently.
        if self.training and self.config.dropout > 0.0:
            raise ValueError(f"{self.name}: decoding is inference; call .eval() first (in training mode dropout="
                             f"{self.config.dropout} would apply to the prefill)")

    def _check_state(self, state: DecodeState) -> None:
        if not isinstance(state, DecodeState):
            raise ValueError(f"{self.name}: state must come from init_state, got {type(state).__name__}")
        if state.mechanism != self.name:
            raise ValueError(f"{self.name}: the state was made by {state.mechanism!r}'s init_state (one state per "
                             "layer, from its own mechanism)")

    def _check_step_inputs(self, q, k, v, state: DecodeState, key_padding_mask) -> torch.Tensor | None:
        for label, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{self.name}: {label} must be a 4-D float tensor {LAYOUT}, got {got}")
        self._check_shapes(q, k, v, batch=state.batch)
        n = q.shape[2]
        if n > state.max_len:
            raise ValueError(f"{self.name}: a prompt of {n} positions exceeds the state's max_len={state.max_len}")
        if key_padding_mask is None:
            return None
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (q.shape[0], n):
            raise ValueError(f"{self.name}: key_padding_mask must be bool (batch, seq) = ({q.shape[0]}, {n}), "
                             f"True = real token; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if not is_right_padded(key_padding_mask):
            raise ValueError(f"{self.name}: a prompt's key_padding_mask must be right-padded (real tokens, then "
                             "padding): each sequence continues from its own end")
        return None if bool(key_padding_mask.all()) else key_padding_mask

    def extra_repr(self) -> str:
        return repr(self.config)
