"""Incremental decoding: the state one layer holds for a batch of sequences.

    state = attn.init_state(batch, max_len, dtype, device)
    out, state = attn.prefill(q, k, v, state, key_padding_mask=mask)    # the prompt, (batch, heads, n, head_dim)
    out_t, state = attn.step(q_t, k_t, v_t, state)                       # one new position, (batch, heads, 1, head_dim)
    attentions.state_bytes(state)                                        # bytes the context so far fills

A :class:`DecodeState` is one object per layer and batch of sequences. The backbone and the benchmark use only
its public methods (:attr:`lengths`, :meth:`nbytes`, :meth:`capacity_bytes`); what it holds inside is the business
of the mechanism's own file, which subclasses it (a KV cache, a ring buffer, a feature sum). Sequences of one batch
may have different lengths: a right-padded prompt leaves each sequence at its own end, and every step appends one
token to each sequence at position ``lengths[b]``.

:class:`RecomputeState` is the form every causal mechanism has without writing one: it keeps the prefix's q, k, v
and runs the causal forward over the whole prefix at each step (what a plug-in without a step form costs; the
benchmark records it as ``decode_form: recompute``).

Owns: the state's accounting. Imports ``torch`` only.
"""

from __future__ import annotations

import torch

STATE_GROWTHS = ("constant", "window", "linear")


class DecodeState:
    """Base of every decoding state: per-sequence lengths and the byte accounting.

    Subclasses store their tensors as attributes. Tensors named in :attr:`positional` hold one slot per position
    along dimension -2 (a KV cache ``(batch, heads, capacity, head_dim)`` or a ring buffer of ``window`` slots):
    :meth:`nbytes` counts the slots the context fills, ``min(lengths[b], capacity)`` per sequence. Every other
    tensor attribute is a fixed-size summary counted whole. Override :meth:`nbytes` where neither fits.
    """

    positional: tuple[str, ...] = ()

    def __init__(self, batch: int, max_len: int, device: torch.device) -> None:
        self.max_len = int(max_len)
        self.mechanism = "?"  # set by Attention.init_state: whose state it is
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens so far, per sequence

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the state holds (``lengths``, the bookkeeping, excluded)."""
        return {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor) and name != "lengths"}

    def capacity_bytes(self) -> int:
        """Bytes allocated for the whole batch (preallocated slots included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def nbytes(self) -> int:
        """Bytes of the filled state for the whole batch: the slots the context so far fills, and every summary."""
        total = 0
        for name, t in self.tensors().items():
            if name in self.positional and t.dim() >= 2 and t.shape[-2] > 0:
                per_slot = t.numel() * t.element_size() // (t.shape[0] * t.shape[-2])
                total += per_slot * int(self.lengths.clamp(max=t.shape[-2]).sum())
            else:
                total += t.numel() * t.element_size()
        return total

    def fill_random(self, context: int, generator: torch.Generator) -> DecodeState:
        """The state of ``context`` tokens per sequence built directly, without a prefill: every floating-point
        tensor filled with uniform values in [0.5, 1.5) from ``generator`` (on the tensors' device), and
        ``lengths = context``. Returns ``self``.

        For the decode benchmark (issue 24): a step's time does not depend on the values in the state, only on
        its shapes and lengths, so a cell whose prefill would exceed the time limit is timed from this state.
        The values are finite, positive (a normaliser or running sum never divides by zero) and never denormal
        (denormals slow CPU arithmetic). The outputs of later steps are meaningless.
        Raises ValueError for ``context`` outside ``[0, max_len]``, and TypeError for a state holding integer
        tensors (bookkeeping such as per-bucket counts, which must agree with ``lengths``): its own file overrides
        this method where it wants the benchmark to build it directly.
        """
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= self.max_len:
            raise ValueError(f"fill_random's context must be an int in [0, max_len={self.max_len}], got {context!r}")
        integer = sorted(name for name, t in self.tensors().items() if not t.is_floating_point())
        if integer:
            raise TypeError(f"{type(self).__name__} holds integer tensors {integer} that must agree with its "
                            "lengths: random values would not make a valid state (override fill_random)")
        for t in self.tensors().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5, generator=generator)
        self.lengths = torch.full_like(self.lengths, context)
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch={self.batch}, max_len={self.max_len}, "
                f"lengths={self.lengths.tolist()}, nbytes={self.nbytes()}, capacity_bytes={self.capacity_bytes()})")


def state_bytes(state: DecodeState) -> int:
    """Bytes the decoding ``state`` holds for the context so far, whole batch (:meth:`DecodeState.nbytes`).

    Raises TypeError for anything that is not a :class:`DecodeState`.
    """
    if not isinstance(state, DecodeState):
        raise TypeError(f"state_bytes expects a DecodeState (from attn.init_state), got {type(state).__name__}")
    return state.nbytes()


class RecomputeState(DecodeState):
    """The prefix's q ``(batch, heads, max_len, head_dim)`` and k, v ``(batch, kv_heads, max_len, head_dim)``: the
    recompute form's state (``kv_heads``: the key-value heads, ``heads`` when None)."""

    positional = ("q", "k", "v")

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kv_heads: int | None = None) -> None:
        super().__init__(batch, max_len, device)
        self.q = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.k, self.v = (torch.zeros(batch, kv_heads or heads, max_len, head_dim, dtype=dtype, device=device)
                          for _ in range(2))


def write_positions(buffers: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
                    positions: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``buffers[i][b, :, positions[b]] = values[i][b, :, 0]`` for one new token per sequence (in place, cast to
    the buffers' dtype).

    ``buffers``: ``(batch, heads, capacity, dim)``; ``values``: ``(batch, heads, 1, dim)``; ``positions``: ``(batch,)``
    long, each ``< capacity`` (a ring buffer passes ``lengths % capacity``). ``rows``: only these sequences (a long
    index), e.g. those whose position the buffer covers; None = all.
    """
    if rows is None:
        rows = torch.arange(positions.shape[0], device=positions.device)
    for buf, val in zip(buffers, values):
        buf[rows, :, positions[rows]] = val[rows, :, 0].to(buf.dtype)


def recompute_step(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RecomputeState) -> torch.Tensor:
    """Append the new token to the prefix and run ``attend`` (the causal forward) over it; the new rows.

    ``attend(q, k, v, key_padding_mask)`` is the mechanism's own causal forward (taking the state's grouped k, v:
    :meth:`attentions.Attention.attend_grouped`). Each sequence's new row sits at
    ``lengths[b]``: a right-padded batch is a padded forward whose real rows do not see the padding.
    """
    pos = state.lengths
    write_positions((state.q, state.k, state.v), (q, k, v), pos)
    n = int(pos.max()) + 1
    mask = torch.arange(n, device=pos.device)[None, :] <= pos[:, None]
    mask = None if bool(mask.all()) else mask
    full = attend(state.q[:, :, :n].to(q.dtype), state.k[:, :, :n].to(q.dtype), state.v[:, :, :n].to(q.dtype), mask)
    rows = torch.arange(q.shape[0], device=pos.device)
    return full[rows, :, pos][:, :, None]
