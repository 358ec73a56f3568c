"""The registry contract as one public function: :func:`check_mechanism`.

    from attentions.testing import check_mechanism
    check_mechanism("my_attention")                      # raises ContractViolation naming the first failure
    check_mechanism("performer", {"num_features": 16})   # with budgets below the test lengths

It is what the project's own contract tests run on every registered mechanism, and what a plug-in's
author runs in one line from their own pytest. The checks, in order (:data:`CHECKS`):

``metadata``        family, complexities, default fields; unknown and invalid parameters rejected by name; a
                    declared state size (``state_size_fn``) is a positive int at the test lengths.
``shapes``          output ``(batch, heads, seq, head_dim)``, finite, at lengths 1, 7, 33, 50.
``bad_inputs``      wrong rank, layout, length, dtype or mask: a ValueError naming the layout or the mask.
``padding``         appended padding leaves the real rows as without it; large values in padded slots
                    change no real row.
``nonfinite_padding`` NaN, +inf or -inf in padded q, k, v: real rows unchanged and finite, gradients finite
                    and exactly zero at the padded slots.
``gradients``       finite gradients (inputs and parameters), exactly zero at padded positions, non-zero at real ones.
``seed_determinism`` the same ``seed`` gives the same output, whatever the global RNG.
``eval_determinism`` in ``eval()`` two calls give the same output.
``dropout``         the info's ``applies_dropout`` says what ``dropout`` really does in training mode.
``max_seq_len``     ``n > max_seq_len`` is a ValueError naming ``max_seq_len``; where the info says
                    ``needs_max_seq_len``, building without one is too.
``causality``       where the info says ``supports_causal``: with ``causal=True`` (lengths 1, 7, 37, 50; positions
                    around block edges) the output at ``i`` on the
                    whole input equals the output on the prefix ending at ``i``, and its gradient with respect
                    to every later input is exactly zero (CAB's check: Zhang et al. 2023, "CAB:
                    Comprehensive Attention Benchmarking on Long Sequence Modeling", ICML).
``decoding``        where the info says ``supports_causal`` (attentions.decoding): prefill of a prompt of
                    length 0, 1 and lengths across block, chunk and window edges, then steps, equal the causal forward
                    at every position; a batch of right-padded prompts of different lengths continues each sequence
                    from its own end; ``state_bytes`` grows as the info says for the params given
                    (``AttentionInfo.growth``; ``constant``: the same whatever the context; ``window``: stops growing
                    once the context passes the window; ``linear``: never shrinks); a full state refuses a step.
``grouped_kv``      grouped-query attention (4 query heads, 2 key-value heads): grouped k, v give the outputs and
                    gradients (summed over each group) that the same key-value heads repeated for their query heads
                    give, with padding, in each pattern (per-head parameters of the grouped module lead with its
                    key-value heads and are repeated for the comparison); with ``causal=True`` a grouped prefill and
                    steps equal the grouped causal forward, and a ``grouped_kv='shared'`` step form's state is exactly
                    1/2 of the ungrouped one (a recompute form's is smaller). ``'refused'``: building with groups is a
                    ValueError naming ``num_kv_heads``.
``memory_growth``   where the mechanism claims sub-quadratic memory (``linear_memory``; by default every
                    family but ``exact``): the CPU allocator peak of a forward + backward grows at most
                    :data:`LINEAR_LIMIT` x per doubling of ``n`` (a quadratic buffer grows 4x), both for the
                    plain step (eval-free, no padding) and for a training step (train mode, attention dropout
                    :data:`TRAIN_DROPOUT` where the info says ``applies_dropout``, a padding mask): dropout must
                    not bring back an ``n x n`` (or stored-mask) allocation (issue 23's dropout policy).

:func:`check_output` is the cheap part of ``shapes`` (output shape, dtype, finiteness at two lengths, default
parameters): the apps run it on every plug-in mechanism as the plug-in is loaded.

Sizes are small (2 heads of 8 dims; lengths up to 64, 2048 for the memory check): give ``params`` with
budgets (windows, features, blocks, buckets) below them so every real code path runs. CPU only.

Owns: the contract's definition. Imports ``torch`` and this package only (never the harness).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._profile import cpu_step_peak
from .registry import FAMILIES, AttentionInfo, build_attention, get_attention_info

HEADS, HEAD_DIM, MAX_LEN = 2, 8, 64
LENGTHS = (1, 7, 33, 50)
ATOL, RTOL = 1e-5, 1e-4
MEMORY_LENGTHS = (1024, 2048)
# Positions checked for causality: around the edges of blocks, buckets and chunks of 3 to 8 (test-size
# budgets), where a causal mask is easiest to get wrong; the middle and the ends are added per length.
CAUSAL_POSITIONS = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 23, 24, 25, 31, 32, 33})
LINEAR_LIMIT = 2.3  # peak growth per doubling of n: 2x plus slack for fixed-size buffers
TRAIN_DROPOUT = 0.1  # attention dropout of the memory check's training step (LRA's recipes use 0.1)


class ContractViolation(AssertionError):
    """A mechanism broke the registry contract: ``name``, the ``check`` (one of :data:`CHECKS`), what was seen."""

    def __init__(self, name: str, check: str, detail: str) -> None:
        super().__init__(f"attention '{name}' violates the contract check '{check}': {detail}")
        self.name, self.check, self.detail = name, check, detail


@dataclass
class _Subject:
    """The mechanism under test, its test-size parameters, and input makers."""

    name: str
    info: AttentionInfo
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> torch.nn.Module:
        kwargs = {"num_heads": HEADS, "head_dim": HEAD_DIM, "max_seq_len": MAX_LEN, **self.params, **overrides}
        return build_attention(self.name, **kwargs)

    @staticmethod
    def qkv(batch: int, seq: int, seed: int, requires_grad: bool = False) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(batch, HEADS, seq, HEAD_DIM, generator=gen).requires_grad_(requires_grad)
                for _ in range(3)]

    def fail(self, check: str, detail: str) -> ContractViolation:
        return ContractViolation(self.name, check, detail)

    def close(self, check: str, actual: torch.Tensor, expected: torch.Tensor, what: str, exact: bool = False) -> None:
        try:
            tol = {"atol": 0.0, "rtol": 0.0} if exact else {"atol": ATOL, "rtol": RTOL}
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as exc:
            raise self.fail(check, f"{what}: {str(exc).splitlines()[0]} {_max_gap(actual, expected)}") from None


def _max_gap(a: torch.Tensor, b: torch.Tensor) -> str:
    gap = (a.detach().double() - b.detach().double()).abs()
    return f"(largest difference {gap.max().item():.3g})" if gap.numel() else ""


def right_padding_mask(lengths: Iterable[int], seq: int) -> torch.Tensor:
    """(batch, seq) bool, True for the first ``lengths[b]`` positions (real tokens)."""
    return torch.arange(seq)[None, :] < torch.tensor(list(lengths))[:, None]


def _fill_padding(tensors: Iterable[torch.Tensor], mask: torch.Tensor, value: float) -> list[torch.Tensor]:
    pad = ~mask[:, None, :, None]
    return [torch.where(pad, torch.full_like(t, value), t) for t in tensors]


# ----------------------------------------------------------------------------------------------- checks


def check_metadata(s: _Subject) -> None:
    info = s.info
    if info.family not in FAMILIES:
        raise s.fail("metadata", f"family {info.family!r} is not one of {FAMILIES}")
    if not (info.time_complexity and info.memory_complexity):
        raise s.fail("metadata", "time_complexity and memory_complexity must be given")
    if not info.supports_padding_mask:
        raise s.fail("metadata", "every mechanism must take a key_padding_mask (supports_padding_mask=False)")
    missing = {"num_heads", "head_dim", "max_seq_len", "seed", "dropout"} - set(info.defaults())
    if missing:
        raise s.fail("metadata", f"config lacks the common fields {sorted(missing)} (subclass AttentionConfig)")
    bad = [("no_such_param", 3), ("num_heads", 0), ("head_dim", -1), ("num_heads", "4"), ("dropout", 1.5)]
    for param, value in bad:
        try:
            s.build(**{param: value})
        except ValueError as exc:
            if f"'{param}'" not in str(exc):
                raise s.fail("metadata", f"{param}={value!r} raised a ValueError not naming '{param}': {exc}") from None
        else:
            raise s.fail("metadata", f"{param}={value!r} was accepted; it must raise a ValueError naming it")
    _check_state_size(s)


def _check_state_size(s: _Subject) -> None:
    """A declared state size (``state_size_fn``) is a positive int at every test length, both forms."""
    if s.info.state_size_fn is None:
        return
    for causal in (False, True) if s.info.supports_causal else (False,):
        params = {"num_heads": HEADS, "head_dim": HEAD_DIM, "max_seq_len": MAX_LEN, **s.params,
                  **({"causal": True} if causal else {})}
        for n in LENGTHS:
            try:
                s.info.state_size(params, n)
            except TypeError as exc:
                raise s.fail("metadata", f"state size at n={n}, causal={causal}: {exc}") from None


def _output_problem(out: Any, q: torch.Tensor) -> str | None:
    """What is wrong with ``out`` as the output for query ``q`` (shape, dtype, finiteness), or None."""
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        return f"output {got}, expected {tuple(q.shape)} {q.dtype}"
    if not torch.isfinite(out).all():
        return "non-finite output"
    return None


def check_shapes(s: _Subject) -> None:
    attn = s.build().eval()
    for batch in (1, 3):
        for seq in LENGTHS:
            q, k, v = s.qkv(batch, seq, seed=seq)
            problem = _output_problem(attn(q, k, v), q)
            if problem:
                raise s.fail("shapes", f"batch {batch}, seq {seq}: {problem}")


# The load-time check: a length that is no power of two (where a reshape goes wrong) and one that divides
# into the usual block sizes; batch 2 with the second row padded.
LOAD_CHECK_LENGTHS = (33, 64)


def check_output(name: str, params: Mapping[str, Any] | None = None) -> bool:
    """The cheap part of the contract, run when a plug-in is loaded (milliseconds): at its default parameters
    (heads 2, head_dim 8), a forward at the first length of :data:`LOAD_CHECK_LENGTHS` the mechanism takes
    (batch 2, the second row right-padded by 3) returns a finite tensor of the query's shape and dtype. The
    global RNG is left as it was.

    Returns True when checked, False when the mechanism declined every length with a ValueError (its declared
    limits; :func:`check_mechanism` with test-size ``params`` is the full check). Raises
    :class:`ContractViolation` (check ``shapes``) for a wrong output, or any other exception at build or forward.
    """
    subject = _Subject(name, get_attention_info(name), dict(params or {}))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for seq in LOAD_CHECK_LENGTHS:
            q, k, v = subject.qkv(2, seq, seed=seq)
            mask = right_padding_mask([seq, max(1, seq - 3)], seq)
            try:
                out = subject.build(max_seq_len=max(LOAD_CHECK_LENGTHS)).eval()(q, k, v, key_padding_mask=mask)
            except ValueError:
                continue  # a declared limit at this size (a window or block that does not fit): not judged here
            except Exception as exc:
                raise subject.fail("shapes", f"batch 2, seq {seq}: raised {type(exc).__name__}: {exc}") from None
            problem = _output_problem(out, q)
            if problem:
                raise subject.fail("shapes", f"batch 2, seq {seq}: {problem}")
            return True  # one length that runs is enough here
    return False


def check_bad_inputs(s: _Subject) -> None:
    attn = s.build()
    q, k, v = s.qkv(2, 10, seed=0)
    layout = "(batch, heads, seq, head_dim)"
    cases: list[tuple[str, Callable[[], Any], str]] = [
        ("3-D inputs", lambda: attn(q[0], k[0], v[0]), layout),
        ("heads and seq swapped", lambda: attn(*(t.transpose(1, 2) for t in (q, k, v))), layout),
        ("k shorter than q", lambda: attn(q, k[:, :, :5], v), layout),
        ("integer inputs", lambda: attn(q.long(), k.long(), v.long()), "float"),
        ("float mask", lambda: attn(q, k, v, key_padding_mask=torch.ones(2, 10)), "key_padding_mask"),
        ("mask of the wrong length", lambda: attn(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool)),
         "key_padding_mask"),
    ]
    for label, call, needle in cases:
        try:
            call()
        except ValueError as exc:
            if needle not in str(exc):
                raise s.fail("bad_inputs", f"{label}: the ValueError does not mention {needle!r}: {exc}") from None
        else:
            raise s.fail("bad_inputs", f"{label} were accepted; expected a ValueError mentioning {needle!r}")


def check_padding(s: _Subject) -> None:
    attn = s.build().eval()
    n, extra = 29, 11
    q, k, v = s.qkv(2, n + extra, seed=1)
    mask = right_padding_mask([n, n], n + extra)
    padded = attn(q, k, v, key_padding_mask=mask)
    unpadded = attn(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    s.close("padding", padded[:, :, :n], unpadded, f"real rows with {extra} padded positions appended differ "
            "from the unpadded input's rows")
    mask = right_padding_mask([41, 23, 6], 41)
    q, k, v = s.qkv(3, 41, seed=2)
    noise = s.qkv(3, 41, seed=3)
    before = attn(q, k, v, key_padding_mask=mask)
    after = attn(*[torch.where(~mask[:, None, :, None], 50.0 * z, t) for t, z in zip((q, k, v), noise)],
                 key_padding_mask=mask)
    for b in range(3):
        s.close("padding", after[b][:, mask[b]], before[b][:, mask[b]],
                f"real rows of sequence {b} change when the contents of padded positions change")


def check_nonfinite_padding(s: _Subject) -> None:
    attn = s.build().eval()
    seq = 30
    mask = right_padding_mask([30, 17], seq)
    q, k, v = s.qkv(2, seq, seed=4)
    clean = attn(q, k, v, key_padding_mask=mask)
    for value in (math.nan, math.inf, -math.inf):
        leaves = [t.detach().requires_grad_(True) for t in _fill_padding((q, k, v), mask, value)]
        out = attn(*leaves, key_padding_mask=mask)
        real = out[1][:, :17]
        if not torch.isfinite(out[0]).all() or not torch.isfinite(real).all():
            raise s.fail("nonfinite_padding", f"{value} in padded slots makes a real row non-finite")
        s.close("nonfinite_padding", real, clean[1][:, :17], f"{value} in padded slots changes real rows")
        (out * mask[:, None, :, None]).square().sum().backward()
        for label, t in zip("qkv", leaves):
            g = t.grad
            if g is None or not torch.isfinite(g).all() or g[1, :, 17:].abs().max() != 0:
                raise s.fail("nonfinite_padding", f"{value} in padded slots: the gradient of {label} is "
                             "missing, non-finite, or non-zero at a padded position")


def check_gradients(s: _Subject) -> None:
    attn = s.build().train()
    seq = 30
    mask = right_padding_mask([30, 17], seq)
    q, k, v = s.qkv(2, seq, seed=4, requires_grad=True)
    out = attn(q, k, v, key_padding_mask=mask)
    (out * mask[:, None, :, None]).square().sum().backward()
    for label, t in zip("qkv", (q, k, v)):
        if t.grad is None:
            raise s.fail("gradients", f"no gradient reaches {label}")
        if not torch.isfinite(t.grad).all():
            raise s.fail("gradients", f"non-finite gradient of {label}")
        if t.grad[1, :, 17:].abs().max() != 0:
            raise s.fail("gradients", f"real outputs have a gradient with respect to padded positions of {label} "
                         f"(largest {t.grad[1, :, 17:].abs().max().item():.3g}); they must not depend on them")
    if sum(t.grad[:, :, :17].abs().sum() for t in (q, k, v)) == 0:
        raise s.fail("gradients", "the gradient with respect to real inputs is zero everywhere")
    for pname, p in attn.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise s.fail("gradients", f"non-finite gradient of the parameter {pname}")


def check_seed_determinism(s: _Subject) -> None:
    q, k, v = s.qkv(2, 26, seed=5)
    torch.manual_seed(123)
    a = s.build(seed=7).eval()
    torch.manual_seed(456)  # the global RNG must not matter: every random buffer comes from `seed`
    b = s.build(seed=7).eval()
    with torch.no_grad():
        s.close("seed_determinism", a(q, k, v), b(q, k, v), "two modules built with seed=7 (different global "
                "RNG states) give different outputs", exact=True)


def check_eval_determinism(s: _Subject) -> None:
    attn = s.build(dropout=0.5).eval()
    q, k, v = s.qkv(2, 26, seed=6)
    with torch.no_grad():
        torch.manual_seed(0)
        first = attn(q, k, v)
        torch.manual_seed(1)
        s.close("eval_determinism", attn(q, k, v), first, "two calls in eval() give different outputs", exact=True)
        s.close("eval_determinism", s.build(dropout=0.0).eval()(q, k, v), first,
                "in eval() the output depends on dropout", exact=True)


def check_dropout(s: _Subject) -> None:
    q, k, v = s.qkv(2, 26, seed=2)
    attn = s.build(dropout=0.5)
    with torch.no_grad():
        expected = attn.eval()(q, k, v)
        torch.manual_seed(0)
        trained = attn.train()(q, k, v)
    changes = not torch.allclose(trained, expected)
    if changes != s.info.applies_dropout:
        said = "applies" if s.info.applies_dropout else "does not apply"
        raise s.fail("dropout", f"the info says it {said} dropout, but dropout=0.5 in training mode "
                     f"{'changes' if changes else 'does not change'} the output (set applies_dropout accordingly)")


def check_max_seq_len(s: _Subject) -> None:
    attn = s.build(max_seq_len=16)
    q, k, v = s.qkv(1, 17, seed=0)
    try:
        attn(q, k, v)
    except ValueError as exc:
        if "max_seq_len" not in str(exc):
            raise s.fail("max_seq_len", f"n=17 > max_seq_len=16 raised a ValueError not naming max_seq_len: {exc}") \
                from None
    else:
        raise s.fail("max_seq_len", "n=17 > max_seq_len=16 was accepted; it must raise a ValueError")
    if s.info.needs_max_seq_len:
        try:
            s.build(max_seq_len=None)
        except ValueError as exc:
            if "max_seq_len" not in str(exc):
                raise s.fail("max_seq_len", f"building without max_seq_len: ValueError not naming it: {exc}") \
                    from None
        else:
            raise s.fail("max_seq_len", "the info says needs_max_seq_len, but it builds with max_seq_len=None")


def check_causality(s: _Subject) -> None:
    if not s.info.supports_causal:
        return
    attn = s.build(causal=True).eval()
    for seq in (1, 7, 37, 50):
        q, k, v = s.qkv(2, seq, seed=seq, requires_grad=True)
        out = attn(q, k, v)
        if not torch.isfinite(out).all():
            raise s.fail("causality", f"seq {seq}: non-finite output with causal=True")
        # Random weights per output entry: a plain sum could hide a leak whose gradients cancel.
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seq))
        for i in sorted((CAUSAL_POSITIONS | {seq // 3, seq // 2, seq - 2, seq - 1}) & set(range(seq))):
            with torch.no_grad():
                prefix = attn(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1])
            s.close("causality", out[:, :, i], prefix[:, :, i], f"seq {seq}: the output at position {i} differs "
                    f"from the output of the prefix ending at {i} (it sees later positions)")
            grads = torch.autograd.grad((out[:, :, i] * weight[:, :, i]).sum(), (q, k, v), retain_graph=True)
            for label, g in zip("qkv", grads):
                later = g[:, :, i + 1:]
                if not torch.isfinite(g).all() or (later.numel() and later.abs().max() != 0):
                    raise s.fail("causality", f"seq {seq}: the output at position {i} has a non-finite gradient "
                                 f"or a non-zero one with respect to a later {label}")
            if sum(g[:, :, : i + 1].abs().sum() for g in grads) == 0:
                raise s.fail("causality", f"seq {seq}: the output at position {i} depends on no input")


# Prompt lengths of the decoding check: empty, one token, and lengths on both sides of the edges of blocks, buckets,
# chunks and windows of 4 to 16 (test-size budgets). Prompt 0 then steps through every position to DECODE_LEN.
DECODE_PROMPTS = (0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33)
DECODE_LEN = 48
DECODE_STEPS = 9  # steps after each non-empty prompt (past the next edge of a budget of 8)


def check_decoding(s: _Subject) -> None:
    if not s.info.supports_causal:
        return
    from .decoding import state_bytes

    attn = s.build(causal=True).eval()
    q, k, v = s.qkv(2, DECODE_LEN, seed=21)
    with torch.no_grad():
        ref = attn(q, k, v)
        for prompt in DECODE_PROMPTS:
            end = DECODE_LEN if prompt == 0 else min(prompt + DECODE_STEPS, DECODE_LEN)
            state = attn.init_state(2, DECODE_LEN, q.dtype, q.device)
            out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], state)
            s.close("decoding", out, ref[:, :, :prompt], f"prefill of a {prompt}-token prompt differs from the causal "
                    "forward")
            sizes = [state_bytes(state)]
            for t in range(prompt, end):
                out_t, state = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
                s.close("decoding", out_t, ref[:, :, t:t + 1], f"after a {prompt}-token prompt, the step at position "
                        f"{t} differs from the causal forward")
                sizes.append(state_bytes(state))
            if prompt == 0:
                _check_growth(s, sizes, state, s.info.growth(attn.config, attn.decode_form))
        _check_padded_prefill(s, attn)
        _check_full_state(s, attn)


def _check_growth(s: _Subject, sizes: list[int], state: Any, growth: str) -> None:
    if any(b < a for a, b in zip(sizes, sizes[1:])) and growth != "window":
        raise s.fail("decoding", f"state_bytes shrinks as the context grows: {sizes}")
    if growth == "constant" and len(set(sizes[1:])) > 1:
        raise s.fail("decoding", f"the info says state_growth='constant', but state_bytes changes with the context: "
                     f"{sorted(set(sizes[1:]))} (contexts 1 to {DECODE_LEN}, max_len fixed)")
    if growth == "window" and sizes[-1] != sizes[-2]:
        raise s.fail("decoding", f"the info says state_growth='window', but state_bytes still grows at context "
                     f"{DECODE_LEN} ({sizes[-2]} -> {sizes[-1]}): give params with a window below {DECODE_LEN}")
    if sizes[-1] > state.capacity_bytes():
        raise s.fail("decoding", f"state_bytes {sizes[-1]} exceeds the allocated capacity {state.capacity_bytes()}")


def _check_padded_prefill(s: _Subject, attn: torch.nn.Module) -> None:
    """Prompts of 13, 5 and 1 real tokens right-padded to 13 (junk in the padding), then 12 steps: every sequence
    continues from its own end and matches its own causal forward."""
    lengths, steps = [13, 5, 1], 12
    q, k, v = s.qkv(3, max(lengths) + steps, seed=22)
    ref = attn(q, k, v)
    mask = right_padding_mask(lengths, max(lengths))
    junk = [50.0 * t for t in s.qkv(3, max(lengths), seed=23)]
    prompt = [torch.where(mask[:, None, :, None], t[:, :, :max(lengths)], z) for t, z in zip((q, k, v), junk)]
    state = attn.init_state(3, max(lengths) + steps, q.dtype, q.device)
    out, state = attn.prefill(*prompt, state, key_padding_mask=mask)
    for b, n in enumerate(lengths):
        s.close("decoding", out[b, :, :n], ref[b, :, :n], f"prefill of right-padded prompts: sequence {b}'s "
                f"{n} real rows differ from the causal forward")
    if state.lengths.tolist() != lengths:
        raise s.fail("decoding", f"after a padded prefill the state's lengths are {state.lengths.tolist()}, "
                     f"expected {lengths}")
    rows = torch.arange(3)
    for t in range(steps):
        pos = torch.tensor(lengths) + t
        new = [x[rows, :, pos][:, :, None] for x in (q, k, v)]
        out_t, state = attn.step(*new, state)
        s.close("decoding", out_t[:, :, 0], ref[rows, :, pos], f"step {t} after right-padded prompts of {lengths} "
                "tokens: a sequence does not continue from its own end")


def _check_full_state(s: _Subject, attn: torch.nn.Module) -> None:
    q, k, v = s.qkv(1, 4, seed=24)
    state = attn.init_state(1, 4, q.dtype, q.device)
    _, state = attn.prefill(q, k, v, state)
    try:
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    except ValueError as exc:
        if "max_len" not in str(exc):
            raise s.fail("decoding", f"a step past max_len raised a ValueError not naming max_len: {exc}") from None
    else:
        raise s.fail("decoding", "a step past the state's max_len was accepted; it must raise a ValueError")


GROUP_HEADS, GROUP_KV_HEADS, GROUP_LEN = 4, 2, 37  # grouped_kv: two groups of two query heads


def check_grouped_kv(s: _Subject) -> None:
    groups = GROUP_HEADS // GROUP_KV_HEADS
    if s.info.grouped_kv == "refused":
        try:
            s.build(num_heads=GROUP_HEADS, num_kv_heads=GROUP_KV_HEADS)
        except ValueError as exc:
            if "num_kv_heads" not in str(exc):
                raise s.fail("grouped_kv", f"its ValueError refusing groups does not name num_kv_heads: {exc}") \
                    from None
            return
        raise s.fail("grouped_kv", "the info says grouped_kv='refused', but it builds with num_kv_heads < num_heads")
    for causal in (False, True) if s.info.supports_causal else (False,):
        grouped = s.build(num_heads=GROUP_HEADS, num_kv_heads=GROUP_KV_HEADS, causal=causal).eval()
        plain = s.build(num_heads=GROUP_HEADS, causal=causal).eval()
        _copy_grouped_tensors(s, grouped, plain, groups)
        _check_grouped_equals_repeated(s, grouped, plain, groups, causal)
        if causal:
            _check_grouped_decoding(s, grouped, plain, groups)


def _grouped_qkv(seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, GROUP_HEADS, seq, HEAD_DIM, generator=gen)
    k, v = (torch.randn(2, GROUP_KV_HEADS, seq, HEAD_DIM, generator=gen) for _ in range(2))
    return [q, k, v]


def _copy_grouped_tensors(s: _Subject, grouped: torch.nn.Module, plain: torch.nn.Module, groups: int) -> None:
    """Give ``plain`` the grouped module's parameters and buffers: equal shapes copied, per-key-value-head ones
    (leading dimension ``kv_heads`` where ``plain`` has ``num_heads``) repeated for their query heads."""
    own = dict(grouped.named_parameters()) | dict(grouped.named_buffers())
    with torch.no_grad():
        for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
            g = own.get(name)
            if g is not None and g.shape == t.shape:
                t.copy_(g)
            elif g is not None and g.dim() and g.shape[0] * groups == t.shape[0] and g.shape[1:] == t.shape[1:]:
                t.copy_(g.repeat_interleave(groups, dim=0))
            else:
                got = None if g is None else tuple(g.shape)
                raise s.fail("grouped_kv", f"the parameter or buffer {name} is {got} in the grouped module and "
                             f"{tuple(t.shape)} without groups: per-head tensors of a grouped mechanism must lead with "
                             "its key-value heads (or keep their shape)")


def _check_grouped_equals_repeated(s: _Subject, grouped, plain, groups: int, causal: bool) -> None:
    pattern = "causal" if causal else "bidirectional"
    lengths = [GROUP_LEN, GROUP_LEN - 17]
    mask = right_padding_mask(lengths, GROUP_LEN)
    base = _grouped_qkv(GROUP_LEN, seed=31)
    mine = [t.clone().requires_grad_(True) for t in base]
    theirs = [t.clone().requires_grad_(True) for t in base]
    out = grouped(*mine, key_padding_mask=mask)
    ref = plain(theirs[0], *(t.repeat_interleave(groups, dim=1) for t in theirs[1:]), key_padding_mask=mask)
    real = mask[:, None, :, None]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(32))
    for b, n in enumerate(lengths):
        s.close("grouped_kv", out[b, :, :n], ref[b, :, :n], f"{pattern}: grouped k, v give another output than the "
                f"same key-value heads repeated for their query heads (sequence {b}, {n} real tokens)")
    (out * real * weight).sum().backward()
    (ref * real * weight).sum().backward()
    for label, a, b in zip("qkv", mine, theirs):
        s.close("grouped_kv", a.grad, b.grad, f"{pattern}: the gradient of {label} with grouped k, v differs from "
                "the one through the key-value heads repeated for their query heads")


def _check_grouped_decoding(s: _Subject, grouped, plain, groups: int) -> None:
    from .decoding import state_bytes

    prompt = 5
    q, k, v = _grouped_qkv(GROUP_LEN, seed=33)
    with torch.no_grad():
        ref = grouped(q, k, v)
        state = grouped.init_state(2, GROUP_LEN, q.dtype, q.device)
        out, state = grouped.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], state)
        s.close("grouped_kv", out, ref[:, :, :prompt], "a grouped prefill differs from the grouped causal forward")
        for t in range(prompt, GROUP_LEN):
            out_t, state = grouped.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            s.close("grouped_kv", out_t, ref[:, :, t:t + 1], f"the grouped step at position {t} differs from the "
                    "grouped causal forward")
        other = plain.init_state(2, GROUP_LEN, q.dtype, q.device)
        _, other = plain.prefill(q, *(t.repeat_interleave(groups, dim=1) for t in (k, v)), other)
    mine, theirs = state_bytes(state), state_bytes(other)
    if s.info.grouped_kv == "shared" and grouped.decode_form == "step" and mine * groups != theirs:
        raise s.fail("grouped_kv", f"the info says grouped_kv='shared', but the decode state of {GROUP_LEN} tokens "
                     f"holds {mine} bytes with {GROUP_KV_HEADS} key-value heads and {theirs} with {GROUP_HEADS}: "
                     f"expected exactly 1/{groups} (one cache or summary per key-value head)")
    if grouped.decode_form == "recompute" and not mine < theirs:
        raise s.fail("grouped_kv", f"the recompute form's state holds {mine} bytes grouped, {theirs} without "
                     "groups: its k, v should be stored per key-value head")


def cpu_peak_bytes(step: Callable[[], Any]) -> int:
    """Allocator peak of ``step()`` on CPU, in bytes, from ``torch.profiler`` allocation events; memory
    allocated before the call does not count. The same figure as the harness's CPU measurements."""
    return cpu_step_peak(step)[1]


def _fwd_bwd_peak(s: _Subject, n: int) -> int:
    attn = s.build(max_seq_len=n if s.info.needs_max_seq_len else None)
    q, k, v = s.qkv(1, n, seed=0, requires_grad=True)
    return cpu_peak_bytes(lambda: attn(q, k, v).sum().backward())


def train_step_peak(s: _Subject, n: int) -> int:
    """CPU allocator peak (bytes) of a training step at length ``n``: train mode, attention dropout
    :data:`TRAIN_DROPOUT` where the info says ``applies_dropout``, batch 2 with the second sequence right-padded
    by a quarter, forward + backward of the output's sum."""
    dropout = TRAIN_DROPOUT if s.info.applies_dropout else 0.0
    attn = s.build(max_seq_len=n if s.info.needs_max_seq_len else None, dropout=dropout).train()
    q, k, v = s.qkv(2, n, seed=0, requires_grad=True)
    mask = right_padding_mask([n, n - n // 4], n)
    with torch.random.fork_rng(devices=[]):  # the dropout draws leave the caller's RNG as it was
        torch.manual_seed(0)
        return cpu_peak_bytes(lambda: attn(q, k, v, key_padding_mask=mask).sum().backward())


def training_step_peak(name: str, n: int, params: Mapping[str, Any] | None = None) -> int:
    """:func:`train_step_peak` of the registered mechanism ``name`` with ``params`` (the memory check's sizes:
    2 heads of 8 dims, batch 2), for tests that measure the training step alone."""
    return train_step_peak(_Subject(name, get_attention_info(name), dict(params or {})), n)


def _growth(s: _Subject, peak: Callable[[_Subject, int], int], what: str, lengths: tuple[int, int]) -> None:
    small, large = (peak(s, n) for n in lengths)
    per_doubling = (large / max(small, 1)) ** (1 / math.log2(lengths[1] / lengths[0]))
    if small <= 0 or per_doubling > LINEAR_LIMIT:
        raise s.fail("memory_growth", f"it claims sub-quadratic memory ({s.info.memory_complexity}), but the peak "
                     f"of {what} grows x{per_doubling:.2f} per doubling of n ({small} bytes at "
                     f"n={lengths[0]}, {large} at n={lengths[1]}; limit x{LINEAR_LIMIT})")


def check_memory_growth(s: _Subject, lengths: tuple[int, int] = MEMORY_LENGTHS) -> None:
    _growth(s, _fwd_bwd_peak, "a forward + backward", lengths)
    _growth(s, train_step_peak, f"a training step (train mode, dropout {TRAIN_DROPOUT}, padding mask)", lengths)


CHECKS: dict[str, Callable[[_Subject], None]] = {
    "metadata": check_metadata,
    "shapes": check_shapes,
    "bad_inputs": check_bad_inputs,
    "padding": check_padding,
    "nonfinite_padding": check_nonfinite_padding,
    "gradients": check_gradients,
    "seed_determinism": check_seed_determinism,
    "eval_determinism": check_eval_determinism,
    "dropout": check_dropout,
    "max_seq_len": check_max_seq_len,
    "causality": check_causality,
    "decoding": check_decoding,
    "grouped_kv": check_grouped_kv,
    "memory_growth": check_memory_growth,
}


def check_mechanism(name: str, params: Mapping[str, Any] | None = None, *, checks: Iterable[str] | None = None,
                    linear_memory: bool | None = None) -> list[str]:
    """Run the registry contract on the registered mechanism ``name``; returns the checks that ran.

    ``params``: config overrides for the test sizes (heads 2, head_dim 8, lengths <= 64; memory at
    n = 1024 and 2048), e.g. budgets below those lengths. ``checks``: a subset of :data:`CHECKS` (default:
    all, in order). ``linear_memory``: whether to hold it to sub-quadratic memory growth (default: its
    family is not ``exact``). ``causality`` and ``decoding`` run only where the info says ``supports_causal``.

    Raises :class:`ContractViolation` (an AssertionError) naming the mechanism, the first failed check and
    what was seen (also where the mechanism raised inside the check: the exception is chained); ValueError for
    an unknown mechanism or check name.
    """
    subject = _Subject(name, get_attention_info(name), dict(params or {}))
    selected = list(CHECKS) if checks is None else list(checks)
    unknown = [c for c in selected if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; allowed: {list(CHECKS)}")
    if linear_memory is None:
        linear_memory = subject.info.family != "exact"
    ran = []
    for check in selected:
        if (check == "memory_growth" and not linear_memory) or (check in ("causality", "decoding")
                                                                  and not subject.info.supports_causal):
            continue
        try:
            CHECKS[check](subject)
        except ContractViolation:
            raise
        except Exception as exc:  # a mechanism that crashes inside a check fails that check, by name
            raise ContractViolation(name, check, f"raised {type(exc).__name__}: {exc}") from exc
        ran.append(check)
    return ran
