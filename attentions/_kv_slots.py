"""Key-value slots: the decoding state of the exact and sparse step forms (full, sliding_window, longformer, bigbird).

A :class:`KVSlots` state holds the keys and values of one layer for a batch of sequences in ``slots`` positions
per sequence, ``(batch, heads, slots, head_dim)`` each, in the dtype given to ``init_state``. Position ``p`` lives
in slot ``p % slots``: with ``slots == max_len`` that is a KV cache (slot = position), with fewer slots a ring
buffer of the ``slots`` most recent positions (sliding_window's band). The helpers write one new token per
sequence (:func:`write_slots`), fill the slots from a right-padded prompt (:func:`fill_slots`), say which slots
hold a position a query may read (:func:`filled`), and run the one-query attention over chosen slots
(:func:`attend_slots`, the fused SDPA kernel). Which slots a query reads is the mechanism's business.

Grouped-query attention (config ``num_kv_heads``): the slots hold the ``num_kv_heads`` key-value heads only, so a
state is ``1 / groups`` of the ungrouped one, and :func:`attend_slots` lets each key-value head serve its
``groups`` consecutive query heads through SDPA's ``enable_gqa`` (no copy of the slots: the CPU kernel reads them
in place, measured: the allocator peak of a grouped step is the same few KiB as an ungrouped one).

Owns: the slot layout and the one-query read. Imports ``torch`` and :mod:`attentions.decoding` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoding import DecodeState, write_positions


class KVSlots(DecodeState):
    """Keys ``k`` and values ``v``, ``(batch, heads, slots, head_dim)`` each; position ``p`` in slot ``p % slots``.

    ``heads`` is the number of key-value heads (config ``kv_heads``: ``num_kv_heads``, else ``num_heads``), each
    serving its group of query heads (:func:`attend_slots`). Both tensors are positional:
    ``nbytes`` counts ``min(lengths[b], slots)`` slots per sequence, so a ring stops growing once full.
    """

    positional = ("k", "v")

    def __init__(self, batch: int, max_len: int, slots: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(batch, max_len, device)
        self.k, self.v = (torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device) for _ in range(2))

    @property
    def slots(self) -> int:
        return int(self.k.shape[2])


def check_slots(name: str, state: DecodeState, cls: type, **expected: int) -> None:
    """ValueError unless ``state`` is a ``cls`` whose attributes equal ``expected`` (e.g. ``slots=129``): a state of
    the same mechanism built with another window would otherwise be read with the wrong layout."""
    if not isinstance(state, cls):
        raise ValueError(f"{name}: expected a {cls.__name__} from this mechanism's init_state, got "
                         f"{type(state).__name__}")
    got = {key: getattr(state, key) for key in expected}
    if got != expected:
        raise ValueError(f"{name}: the state was made for another configuration ({got}; this mechanism needs "
                         f"{expected})")


def write_slots(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Write one new token per sequence, ``k``/``v`` ``(batch, heads, 1, d)``, at ``positions`` ``(batch,)`` long,
    into slot ``positions % slots`` of ``k_buf``/``v_buf`` ``(batch, heads, slots, d)``
    (:func:`attentions.decoding.write_positions`). ``rows``: only these sequences (a long index)."""
    if k_buf.shape[2] == 0:  # a buffer of no slots (longformer without globals ahead): no sequence writes to it
        return
    write_positions((k_buf, v_buf), (k, v), positions % k_buf.shape[2], rows)


def fill_slots(k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               lengths: torch.Tensor | None) -> None:
    """Fill empty buffers ``(batch, heads, slots, d)`` from a right-padded prompt ``(batch, heads, n, d)`` whose
    sequence ``b`` has ``lengths[b]`` real tokens (padded slots already zero): slot ``s`` gets the latest real
    position ``p < lengths[b]`` with ``p % slots == s``, or stays zero when there is none.

    With ``slots >= n`` that is slot = position (a plain copy, ``lengths`` unused, may be None; slots holding
    padding are overwritten by the steps before any query may read them). Otherwise the latest position of slot ``s`` is
    ``last - ((last - s) mod slots)``, ``last = lengths[b] - 1``: a gather of the last ``slots`` real tokens.
    """
    batch, heads, n, d = k.shape
    slots = k_buf.shape[2]
    if n == 0:
        return
    if slots >= n or lengths is None:
        if slots < n:
            raise ValueError(f"fill_slots: a prompt of {n} positions needs its lengths to fill {slots} slots")
        k_buf[:, :, :n] = k.to(k_buf.dtype)
        v_buf[:, :, :n] = v.to(v_buf.dtype)
        return
    last = lengths[:, None] - 1
    pos = last - torch.remainder(last - torch.arange(slots, device=k.device), slots)  # (batch, slots)
    index = pos.clamp(min=0)[:, None, :, None].expand(batch, heads, slots, d)
    real = (pos >= 0)[:, None, :, None]
    for buf, x in ((k_buf, k), (v_buf, v)):
        buf.copy_(torch.where(real, x.gather(2, index), torch.zeros((), dtype=x.dtype, device=x.device)))


def filled(slots: int, positions: torch.Tensor) -> torch.Tensor:
    """``(batch, slots)`` bool: the slots that hold a position ``<= positions[b]`` once the token at
    ``positions[b]`` is written (slot ``s`` is filled iff ``s <= p``; a full ring, ``p >= slots - 1``, is all
    filled)."""
    return torch.arange(slots, device=positions.device)[None, :] <= positions[:, None]


def attend_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence over chosen key slots: ``softmax(q k^T / sqrt(d)) v`` with SDPA (the fused kernel).

    ``q``: ``(batch, heads, 1, d)``; ``k``/``v``: ``(batch, kv_heads, K, d)`` (cast to ``q``'s dtype), ``kv_heads``
    dividing ``heads``: key-value head ``j`` serves the query heads ``j g .. j g + g - 1`` (``g = heads / kv_heads``,
    SDPA's ``enable_gqa``: read in place, not repeated); ``allowed``: bool ``(batch, K)`` (every row must allow at
    least one slot) or None for all. Returns ``(batch, heads, 1, d)``.
    The order of the slots does not matter: the softmax is one joint sum over the allowed keys.
    """
    mask = None if allowed is None else allowed[:, None, None, :]
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])
