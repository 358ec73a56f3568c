"""Linear (kernel) attention that keeps only O(n d) tensors for backward: features recomputed chunk by chunk.

``out = phi(Q) (phi(K)^T [V, 1])`` ratio, bidirectional or causal, as in :mod:`attentions._random_features`,
but inside one ``torch.autograd.Function`` that never holds an ``(n, m)`` feature tensor: the forward
computes the features of one chunk of ``CHUNK`` rows at a time, and the backward recomputes them (the
feature map's projection, stabilisers included) from ``q`` and ``k``. What is kept for backward: ``q``,
``k``, ``v``, the output, the denominators ``(b, h, n, 1)``, the ``(m, d + 1)`` sums (bidirectional) or
one such state per causal chunk, and the per-feature stabiliser references; a bidirectional sequence of
a single chunk keeps its features (no more than one chunk's worth) instead of recomputing them. The
gradients are the exact gradients of the same function (tested against the stored autograd path, which
mechanisms keep behind ``recompute=False``).

Feature maps (:class:`FeatureMap`) come in two kinds:

- ``exp`` maps (Performer's FAVOR+): the map gives log-features; the engine exponentiates them with
  the stored path's exact stabilisers. Bidirectional: keys are shifted per feature by their maximum over
  the real keys (here a running maximum over key chunks, the sums rescaled when it grows: the same
  result up to rounding), queries add that shift back and subtract their own row maximum. Causal: the
  running maximum per chunk, the carried state decayed by ``exp(T_{c-1} - T_c)`` when entering chunk
  ``c``, and the whole computation redone in float64 when a row's shared exponent exceeds its true
  largest log-term by more than ``FP32_EXCESS`` nats (the same rule as ``causal_exp_linear_attention``).
  All references are detached (their exact gradient is zero).
- direct maps (RFA's sin/cos, the ReLU kernel): the map gives the features themselves.

Grouped-query attention: ``q`` may have ``g`` times the heads of ``k`` and ``v`` only as ``(B, g, n, d)`` against
``(B, 1, n, d)`` (see :func:`group_heads`, which puts a key-value head's ``g`` query heads on the head axis and the
key-value heads on the batch axis): the key side (sums, stabiliser references, causal chunk states) is computed once
per key-value head and every query head of the group reads it (products broadcast over the head axis; the key-side
gradients are summed over it). With ``g == 1`` (heads equal) nothing changes.

Padded keys: their ``[v, 1]`` rows are zero (and exp maps set their log-features to ``-inf``), so they
add nothing; their gradients are zero. The denominator is clamped from below at ``floor`` (a tensor
broadcastable to ``(b, h, n, 1)``, with its gradient, or None for the smallest positive normal).
"""

from __future__ import annotations

import torch

from . import _random_features
from .decoding import DecodeState

# Rows per chunk of the bidirectional sweeps, as a number of feature entries per (batch, head): the
# working set is a few (chunk x m) tensors, 2 MiB each at m = 256, batch 2, 4 heads, fp32.
CHUNK_ELEMENTS = 65536
# Rows per chunk of the causal sweep: one (m, d + 1) state is kept per chunk, so memory falls with a
# longer chunk while the in-chunk (C x C) products cost C m per row (see the README's causal note).
CAUSAL_CHUNK = 128


class FeatureMap:
    """What the engine asks of a feature map; ``side`` is ``"q"`` or ``"k"``.

    ``exp``: True if :meth:`project` returns log-features (exponentiated by the engine), False if features.
    ``params``: tensors the map depends on that may need gradients (passed through the autograd function).
    """

    exp: bool = False

    def num_features(self) -> int:
        raise NotImplementedError

    def project(self, x: torch.Tensor, side: str, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``(b, h, C, d)`` chunk -> ``(b, h, C, m)`` (log-)features, in ``x``'s dtype."""
        raise NotImplementedError

    def project_backward(self, x: torch.Tensor, t: torch.Tensor, grad_t: torch.Tensor, side: str,
                         params: tuple[torch.Tensor, ...], param_grads: list) -> torch.Tensor:
        """Gradient of ``x`` from the gradient of :meth:`project`'s output ``t`` (None for exp maps when the
        engine did not recompute it); adds the gradients of ``params`` to ``param_grads`` in place."""
        raise NotImplementedError


def lean_linear_attention(fmap: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_padding_mask: torch.Tensor | None, floor: torch.Tensor | None = None,
                          causal: bool = False, params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Linear attention of ``fmap``'s features, ``(b, h, n, d)`` inputs, returns ``v``'s dtype.

    Computed in ``promote(q.dtype, float32)``. ``floor``: lower bound of each row's denominator (see the
    module docstring). ``params``: the map's tensors that may require gradients (e.g. RFA's bandwidth).
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    real = key_padding_mask
    out = _LeanLinear.apply(fmap, causal, real, q.to(compute), k.to(compute), v.to(compute),
                            None if floor is None else floor.to(compute), *params)
    return out.to(v.dtype)


# ----------------------------------------------------------------------------- helpers


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _bidir_chunk(fmap: FeatureMap, n: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(1, fmap.num_features()))


def _values(v: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """``[v, 1]`` of one chunk with padded rows zero: one product gives numerator and denominator."""
    values = torch.nn.functional.pad(v, (0, 1), value=1.0)
    return values if pad is None else values.masked_fill(pad, 0.0)


def _pad_rows(real: torch.Tensor | None, a: int, z: int) -> torch.Tensor | None:
    """``(b, 1, C, 1)`` True on padded rows of the chunk ``a:z``, or None."""
    return None if real is None else ~real[:, None, a:z, None]


def _rows(t: torch.Tensor | None, a: int, z: int, n: int) -> torch.Tensor | None:
    """Rows ``a:z`` of a tensor broadcastable to ``(b, h, n, 1)`` (itself when it does not vary along n)."""
    if t is None or t.dim() < 2 or t.shape[-2] != n or n == 1:
        return t
    return t[..., a:z, :]


def _effective(reference: torch.Tensor) -> torch.Tensor:
    """A running maximum with ``-inf`` (no real key yet) read as 0, as ``nan_to_num(neginf=0)``."""
    return torch.where(torch.isfinite(reference), reference, torch.zeros_like(reference))


def _rescale(old: torch.Tensor, new_eff: torch.Tensor) -> torch.Tensor:
    """``exp(old - new)`` per feature, 0 where ``old`` is ``-inf`` (nothing summed yet: no ``inf * 0``)."""
    return torch.where(torch.isfinite(old), torch.exp(old - new_eff), torch.zeros_like(new_eff))


def _ratio(sums: torch.Tensor, floor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[num, den]`` -> (``num / max(den, floor)``, ``den``)."""
    num, den = sums[..., :-1], sums[..., -1:]
    bound = torch.finfo(sums.dtype).tiny if floor is None else floor
    return num / torch.maximum(den, torch.as_tensor(bound, dtype=sums.dtype)), den


def _ratio_backward(grad: torch.Tensor, out: torch.Tensor, den: torch.Tensor, floor: torch.Tensor | None):
    """Gradient of ``[num, den]`` from the output's, and of the floor (rows where it was the denominator)."""
    bound = torch.as_tensor(torch.finfo(den.dtype).tiny if floor is None else floor, dtype=den.dtype)
    clamped = den < bound
    used = torch.where(clamped, bound, den)
    grad_num = grad / used
    grad_den = -(grad_num * out).sum(-1, keepdim=True)
    grad_floor = torch.where(clamped, grad_den, torch.zeros_like(grad_den))
    return torch.cat([grad_num, grad_den.masked_fill(clamped, 0.0)], dim=-1), grad_floor


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(like.shape) if grad.shape != like.shape else grad


def _kv_side(t: torch.Tensor, heads: int) -> torch.Tensor:
    """A key-side gradient computed per query head ``(B, g, ...)`` summed over the group to ``(B, 1, ...)`` when the
    key side has one head per group (``heads`` = the key side's heads); itself when the heads are equal."""
    return t if t.shape[1] == heads else t.sum(1, keepdim=True)


def group_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None):
    """Grouped-query layout for the engine: q ``(b, h, n, d)`` with k, v ``(b, h_kv, n, d)`` (key-value head ``j``
    serving the ``g = h / h_kv`` consecutive query heads ``j g .. j g + g - 1``) -> q ``(b h_kv, g, n, d)``, k, v
    ``(b h_kv, 1, n, d)``, the mask ``(b h_kv, n)`` (or None). Views where the inputs are contiguous (the mask is
    repeated: ``b h_kv n`` booleans). :func:`ungroup_heads` undoes it on the output."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b * kv, h // kv, n, d)
    k, v = k.reshape(b * kv, 1, n, d), v.reshape(b * kv, 1, n, v.shape[-1])
    mask = None if key_padding_mask is None else key_padding_mask.repeat_interleave(kv, dim=0)
    return q, k, v, mask


def ungroup_heads(out: torch.Tensor, batch: int) -> torch.Tensor:
    """``(b h_kv, g, n, e)`` -> ``(b, h_kv g, n, e)``: the inverse of :func:`group_heads` on an output."""
    bk, g, n, e = out.shape
    return out.reshape(batch, bk // batch * g, n, e)


# ----------------------------------------------------------------------------- the function


class _LeanLinear(torch.autograd.Function):
    """Forward and backward of :func:`lean_linear_attention`; see the module docstring for what is kept."""

    @staticmethod
    def forward(ctx, fmap, causal, real, q, k, v, floor, *params):
        with torch.no_grad():
            if causal:
                out, den, saved = _causal_forward(fmap, real, q, k, v, floor, params, q.dtype)
                if saved is None:  # a row would lose its terms in float32: the stored path's float64 rule
                    out, den, saved = _causal_forward(fmap, real, q, k, v, floor, params, torch.float64)
            else:
                out, den, saved = _bidir_forward(fmap, real, q, k, v, floor, params)
        ctx.fmap, ctx.causal, ctx.real, ctx.has_floor = fmap, causal, real, floor is not None
        ctx.save_for_backward(q, k, v, out, den, floor, *saved, *params)
        ctx.num_saved, ctx.num_params = len(saved), len(params)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, den, floor, *rest = ctx.saved_tensors
        saved, params = rest[:ctx.num_saved], tuple(rest[ctx.num_saved:])
        param_grads = [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            run = _causal_backward if ctx.causal else _bidir_backward
            dq, dk, dv, dfloor = run(ctx.fmap, ctx.real, q, k, v, out, den, floor, saved, params, param_grads,
                                     grad_out.to(out.dtype))
        dfloor = None if floor is None else _sum_to(dfloor, floor).to(floor.dtype)
        return (None, None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dfloor,
                *[g.to(p.dtype) for g, p in zip(param_grads, params)])


# ----------------------------------------------------------------------------- bidirectional


def _key_sums(fmap, real, k, v, params):
    """``(phi(K)^T [V, 1], shift, phi_k)``: the ``(b, h, m, d + 1)`` sums over key chunks, the exp maps'
    per-feature reference ``(b, h, 1, m)`` (else None), and the key features when they are one chunk."""
    b, h, n, d = v.shape
    sums = k.new_zeros(b, h, fmap.num_features(), d + 1)
    reference = phi = None
    spans = _spans(n, _bidir_chunk(fmap, n))
    for a, z in spans:
        pad = _pad_rows(real, a, z)
        phi = fmap.project(k[..., a:z, :] if pad is None else k[..., a:z, :].masked_fill(pad, 0.0), "k", params)
        if fmap.exp:
            if pad is not None:
                phi.masked_fill_(pad, float("-inf"))
            grown = phi.amax(dim=-2, keepdim=True)  # (b, h, 1, m)
            grown = grown if reference is None else torch.maximum(reference, grown)
            if reference is not None:  # the sums so far were relative to the old maximum
                sums.mul_(_rescale(reference, _effective(grown)).transpose(-1, -2))
            reference = grown
            phi = phi.sub_(_effective(reference)).exp_()
        sums.add_(torch.matmul(phi.transpose(-1, -2), _values(v[..., a:z, :], pad)))
    shift = None if reference is None else _effective(reference)
    return sums, shift, (phi if len(spans) == 1 else None)


def _query_features(fmap, x, shift, params):
    """Query features of one chunk: exp maps add the key shift and subtract the row maximum."""
    t = fmap.project(x, "q", params)
    if not fmap.exp:
        return t
    t = t.add_(shift)
    return t.sub_(t.amax(dim=-1, keepdim=True)).exp_()


def _bidir_forward(fmap, real, q, k, v, floor, params):
    """Returns ``(out, den, saved)``; ``saved`` holds the sums and shift, and the features of a one-chunk
    sequence (no bigger than a chunk: kept rather than recomputed, which matters at short lengths)."""
    n = q.shape[-2]
    sums, shift, phi_k = _key_sums(fmap, real, k, v, params)
    out = v.new_empty(q.shape[:-1] + v.shape[-1:])  # q's heads (grouped: the group's query heads)
    den = v.new_empty(q.shape[:-1] + (1,))
    phi = None
    for a, z in _spans(n, _bidir_chunk(fmap, n)):
        phi = _query_features(fmap, q[..., a:z, :], shift, params)
        out[..., a:z, :], den[..., a:z, :] = _ratio(torch.matmul(phi, sums), _rows(floor, a, z, n))
    saved = [sums, q.new_zeros(()) if shift is None else shift]
    if phi_k is not None:
        saved += [phi, phi_k]
    return out, den, tuple(saved)


def _bidir_backward(fmap, real, q, k, v, out, den, floor, saved, params, param_grads, grad_out):
    sums, shift, *cached = saved
    n = q.shape[-2]
    chunk = _bidir_chunk(fmap, n)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dsums = torch.zeros_like(sums)
    dfloor = None if floor is None else torch.zeros_like(den)
    for a, z in _spans(n, chunk):
        x = q[..., a:z, :]
        if cached:
            t, phi = (None if fmap.exp else cached[0]), cached[0]
        else:
            t = fmap.project(x, "q", params)
            phi = _query_features_from(fmap, t, shift)
        dsum, dfl = _ratio_backward(grad_out[..., a:z, :], out[..., a:z, :], den[..., a:z, :], _rows(floor, a, z, n))
        if dfloor is not None:
            dfloor[..., a:z, :] = dfl
        dsums.add_(_kv_side(torch.matmul(phi.transpose(-1, -2), dsum), dsums.shape[1]))
        dphi = torch.matmul(dsum, sums.transpose(-1, -2))
        dq[..., a:z, :] = fmap.project_backward(x, t, dphi.mul_(phi) if fmap.exp else dphi, "q", params, param_grads)
    for a, z in _spans(n, chunk):
        pad = _pad_rows(real, a, z)
        x = k[..., a:z, :] if pad is None else k[..., a:z, :].masked_fill(pad, 0.0)
        if cached:
            t, phi = (None if fmap.exp else cached[1]), cached[1]
        else:
            t = fmap.project(x, "k", params)
            phi = t
            if fmap.exp:
                phi = (t if pad is None else t.masked_fill(pad, float("-inf"))).sub(shift).exp_()
        values = _values(v[..., a:z, :], pad)
        dvalues = torch.matmul(phi, dsums)
        dv[..., a:z, :] = dvalues[..., :-1] if pad is None else dvalues[..., :-1].masked_fill(pad, 0.0)
        dphi = torch.matmul(values, dsums.transpose(-1, -2))
        dk[..., a:z, :] = fmap.project_backward(x, t, dphi.mul_(phi) if fmap.exp else dphi, "k", params, param_grads)
    return dq, dk, dv, dfloor


def _query_features_from(fmap, t, shift):
    """:func:`_query_features` from an already projected chunk ``t`` (kept intact for the map's backward)."""
    if not fmap.exp:
        return t
    s = t + shift
    return s.sub_(s.amax(dim=-1, keepdim=True)).exp_()


# ----------------------------------------------------------------------------- causal


def _causal_chunk_features(fmap, xq, xk, pad, previous, params, dtype, check=True):
    """One causal chunk's ``(phi_q, phi_k, tq, tk, reference, decay, excess)``.

    exp maps: ``reference`` is the running maximum ``T_c`` of the key log-features up to the chunk's
    end (``-inf`` before the first real key), ``decay = exp(T_{c-1} - T_c)`` (0 before any real key),
    ``excess`` the largest amount by which a row's shift exceeds a lower bound of its true largest
    log-term (as ``causal_exp_linear_attention``). Direct maps: ``reference``, ``decay``, ``excess`` None.
    """
    tq = fmap.project(xq, "q", params).to(dtype)
    tk = fmap.project(xk, "k", params).to(dtype)
    if not fmap.exp:
        return tq, tk, tq, tk, None, None, None
    if pad is not None:
        tk = tk.masked_fill(pad, float("-inf"))
    chunk_max = tk.amax(dim=-2, keepdim=True)
    reference = chunk_max if previous is None else torch.maximum(previous, chunk_max)
    ref = _effective(reference)
    decay = None if previous is None else _rescale(previous, ref)
    shifted = tq + ref
    row_shift = shifted.amax(dim=-1, keepdim=True)
    excess = None
    if check:  # the backward reuses the forward's decision
        seen = tk if previous is None else torch.maximum(tk, previous)
        true_max = (tq + seen).amax(dim=-1, keepdim=True)
        excess = (row_shift - true_max).nan_to_num(nan=0.0, neginf=0.0, posinf=0.0).amax()
    phi_q = shifted.sub_(row_shift).exp_()
    phi_k = (tk - ref).exp_()
    return phi_q, phi_k, tq, tk, reference, decay, excess


def _causal_forward(fmap, real, q, k, v, floor, params, dtype):
    """Chunked prefix sums; returns ``(out, den, saved)``, or ``saved = None`` if float32 would lose a row."""
    b, h, n, d = v.shape
    chunk = min(CAUSAL_CHUNK, n)
    spans = _spans(n, chunk)
    m = fmap.num_features()
    states = v.new_empty(b, h, len(spans), m, d + 1, dtype=dtype)  # per key-value head
    references = v.new_empty(b, h, len(spans), m, dtype=dtype) if fmap.exp else None
    out = v.new_empty(q.shape[:-1] + (d,), dtype=dtype)  # q's heads (grouped: the group's query heads)
    den = v.new_empty(q.shape[:-1] + (1,), dtype=dtype)
    carried = v.new_zeros(b, h, m, d + 1, dtype=dtype)  # state + this chunk's sums, before the next decay
    previous = None
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    for c, (a, z) in enumerate(spans):
        pad = _pad_rows(real, a, z)
        xk = k[..., a:z, :] if pad is None else k[..., a:z, :].masked_fill(pad, 0.0)
        phi_q, phi_k, _, _, reference, decay, excess = _causal_chunk_features(
            fmap, q[..., a:z, :].to(dtype), xk.to(dtype), pad, previous, params, dtype)
        if excess is not None and dtype != torch.float64 and excess > _random_features.FP32_EXCESS:
            return None, None, None
        if fmap.exp:
            references[:, :, c] = reference[..., 0, :]
            previous = reference
            if decay is not None:
                carried.mul_(decay.transpose(-1, -2))
        states[:, :, c] = carried
        values = _values(v[..., a:z, :].to(dtype), pad)
        scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)).masked_fill_(~tril[: z - a, : z - a], 0.0)
        sums = torch.matmul(phi_q, carried).add_(torch.matmul(scores, values))
        out[..., a:z, :], den[..., a:z, :] = _ratio(sums, _rows(None if floor is None else floor.to(dtype), a, z, n))
        carried.add_(torch.matmul(phi_k.transpose(-1, -2), values))
    saved = (states,) if references is None else (states, references)
    return out, den, saved


def _causal_backward(fmap, real, q, k, v, out, den, floor, saved, params, param_grads, grad_out):
    """Reverse sweep over the chunks, one recomputation of each chunk's features."""
    states, references = (saved[0], None) if len(saved) == 1 else saved
    dtype = states.dtype
    b, h, n, d = v.shape
    chunk = min(CAUSAL_CHUNK, n)
    spans = _spans(n, chunk)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dfloor = None if floor is None else torch.zeros_like(den)
    later = torch.zeros_like(states[:, :, 0])  # gradient of the state carried out of the chunk (before decay)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    grad_out = grad_out.to(dtype)
    for c in range(len(spans) - 1, -1, -1):
        a, z = spans[c]
        pad = _pad_rows(real, a, z)
        xq = q[..., a:z, :].to(dtype)
        xk = (k[..., a:z, :] if pad is None else k[..., a:z, :].masked_fill(pad, 0.0)).to(dtype)
        previous = None if references is None or c == 0 else references[:, :, c - 1, None, :]
        phi_q, phi_k, tq, tk, _, decay, _ = _causal_chunk_features(fmap, xq, xk, pad, previous, params, dtype,
                                                                        check=False)
        mask = ~tril[: z - a, : z - a]
        values = _values(v[..., a:z, :].to(dtype), pad)
        dsum, dfl = _ratio_backward(grad_out[..., a:z, :], out[..., a:z, :], den[..., a:z, :],
                                    _rows(None if floor is None else floor.to(dtype), a, z, n))
        if dfloor is not None:
            dfloor[..., a:z, :] = dfl
        state = states[:, :, c]
        scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)).masked_fill_(mask, 0.0)
        dscores = torch.matmul(dsum, values.transpose(-1, -2)).masked_fill_(mask, 0.0)
        dphi_q = torch.matmul(dsum, state.transpose(-1, -2)).add_(torch.matmul(dscores, phi_k))
        # Grouped: the query heads of a group meet the same keys, so the key side's gradients sum over them.
        dphi_k = _kv_side(torch.matmul(dscores.transpose(-1, -2), phi_q), h).add_(
            torch.matmul(values, later.transpose(-1, -2)))
        dvalues = _kv_side(torch.matmul(scores.transpose(-1, -2), dsum), h).add_(torch.matmul(phi_k, later))
        dv[..., a:z, :] = dvalues[..., :-1] if pad is None else dvalues[..., :-1].masked_fill(pad, 0.0)
        # Gradient of the state entering this chunk; the chunk before carried it out before this decay.
        later = later.add_(_kv_side(torch.matmul(phi_q.transpose(-1, -2), dsum), h))
        if decay is not None:
            later.mul_(decay.transpose(-1, -2))
        dq[..., a:z, :] = fmap.project_backward(xq, tq, dphi_q.mul_(phi_q) if fmap.exp else dphi_q, "q", params,
                                                param_grads)
        dk[..., a:z, :] = fmap.project_backward(xk, tk, dphi_k.mul_(phi_k) if fmap.exp else dphi_k, "k", params,
                                                param_grads)
    return dq, dk, dv, dfloor


# ----------------------------------------------------------------------------- decoding (one token at a time)
#
# The causal form above is the prefix-sum recurrence S_i = sum_{j <= i} phi(k_j) [v_j, 1]^T evaluated chunk by
# chunk. Decoding keeps S (``(b, h, m, d + 1)``, float32 or wider) and, for exp maps, the per-feature running
# maximum T of the key log-features that S is relative to. A new key raises T to T' = max(T, log phi(k)): S is
# rescaled by exp(T - T') (0 where T is -inf: nothing summed yet), then exp(log phi(k) - T') [v, 1] is added: the
# same change of reference the causal form applies when a chunk raises the running maximum, one token per chunk.
# The query uses exp(log phi(q) + T' - N), N its row maximum, as in the causal form. With one token per chunk the
# running maximum covers exactly the keys j <= i, so N equals the row's true largest log-term: no row ever needs
# the float64 fallback, and each output equals the causal form's up to float rounding (the references cancel).


class FeatureSumState(DecodeState):
    """A kernel mechanism's decoding state: ``sums`` ``(batch, heads, m, d + 1)`` = ``phi(K)^T [V, 1]`` over the
    prefix, and (exp maps) ``reference`` ``(batch, heads, 1, m)``, the running maximum of the key log-features that the
    sums are relative to (``-inf`` before the first key). Float32 or wider whatever the input dtype; fixed size."""

    def __init__(self, batch: int, max_len: int, heads: int, features: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, exp: bool) -> None:
        super().__init__(batch, max_len, device)
        self.sums = torch.zeros(batch, heads, features, head_dim + 1, dtype=dtype, device=device)
        self.reference = (torch.full((batch, heads, 1, features), float("-inf"), dtype=dtype, device=device)
                          if exp else None)


def prefix_sums(fmap: FeatureMap, real: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
                params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoding state after a prompt: ``(sums, reference)``.

    ``k, v``: ``(b, h, n, d)``, ``n >= 0``; ``real``: ``(b, n)`` bool or None. ``sums``: ``(b, h, m, d + 1)`` in
    ``dtype``, ``sum_j phi(k_j) [v_j, 1]^T`` over the real keys, exp maps' features relative to ``reference``
    ``(b, h, 1, m)``, the running maximum of the key log-features (``-inf`` for a sequence without a real key);
    direct maps: ``reference`` None. Computed chunk by chunk (:func:`_key_sums`): no ``(n, m)`` tensor.
    """
    b, h, n, d = v.shape
    k, v = k.to(dtype), v.to(dtype)
    if n == 0:
        sums = v.new_zeros(b, h, fmap.num_features(), d + 1)
        reference = v.new_full((b, h, 1, fmap.num_features()), float("-inf")) if fmap.exp else None
        return sums, reference
    sums, shift, _ = _key_sums(fmap, real, k, v, params)
    if not fmap.exp:
        return sums, None
    if real is not None:  # a sequence without a real key has summed nothing: its reference is -inf, not 0
        shift = shift.masked_fill(~real.any(dim=1)[:, None, None, None], float("-inf"))
    return sums, shift


def step_sums(fmap: FeatureMap, sums: torch.Tensor, reference: torch.Tensor | None, k: torch.Tensor,
              v: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Add one key per sequence (``k, v``: ``(b, h, 1, d)``) to ``sums`` in place; returns the new reference.

    Exp maps: the reference rises to ``max(reference, log phi(k))`` and ``sums`` is rescaled to it first.
    """
    dtype = sums.dtype
    t = fmap.project(k.to(dtype), "k", params)  # (b, h, 1, m)
    if fmap.exp:
        grown = torch.maximum(reference, t)
        sums.mul_(_rescale(reference, grown).transpose(-1, -2))
        reference, t = grown, (t - grown).exp_()
    sums.add_(torch.matmul(t.transpose(-1, -2), _values(v.to(dtype), None)))
    return reference


def query_sums(fmap: FeatureMap, sums: torch.Tensor, reference: torch.Tensor | None, q: torch.Tensor,
               floor: torch.Tensor | None, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The output of queries ``q`` ``(b, h, 1, d)`` against the prefix ``sums``: ``(b, h, 1, d)`` in ``q``'s dtype.

    Grouped-query attention: ``sums`` (and ``reference``) may have ``h_kv`` heads dividing ``h``; the ``g = h / h_kv``
    query heads of key-value head ``j`` (``j g .. j g + g - 1``) then read its sums, as ``g`` rows of one head.
    ``floor``: lower bound of the denominator, broadcastable to ``(b, h, 1, 1)``, or None (smallest normal).
    """
    dtype = sums.dtype
    b, h, _, d = q.shape
    x = q.to(dtype).reshape(b, sums.shape[1], -1, d)  # (b, h_kv, g, d): a group's query heads as rows
    phi = fmap.project(x, "q", params) if reference is None else _query_features(fmap, x, reference, params)
    out, _ = _ratio(torch.matmul(phi, sums), None if floor is None else floor.to(dtype))
    return out.reshape(b, h, 1, d).to(q.dtype)
