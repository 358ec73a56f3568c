"""full's chunked recomputing path (CPU, training, dropout): exact softmax attention with the dropout masks of
attentions._dropout, equal to a dense reference built from the same masks, in outputs and gradients; without
dropout equal to SDPA; chosen by the dispatch only where SDPA would store n x n (issue 23)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attentions._full_chunked as chunked_module
from attentions._dropout import draw_seed, keep_mask
from attentions._full_chunked import chunk_rows, chunked_attention
from attentions.full import select_full_backend

from conftest import build_small, make_qkv, right_padding_mask

# (lengths of the batch's sequences, seq): no padding, right padding, a gap (left padding), an all-padding row.
MASKS = {
    "none": None,
    "right": right_padding_mask([45, 30, 1], 45),
    "left": ~right_padding_mask([10, 0, 44], 45),
    "empty_row": right_padding_mask([45, 0, 20], 45),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """7 query rows per chunk at batch 3, 2 heads, 45 keys: several chunks and a short last one."""
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 3 * 2 * 45 * 7)
    assert chunk_rows(3, 2, 45, 45) == 7


def dense_masked_reference(q, k, v, mask, causal, p, seed):
    """softmax attention written out densely, dropout from the per-chunk masks the chunked path draws."""
    batch, heads, n, d = q.shape
    allowed = torch.ones(batch, 1, n, n, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a row with no key allowed sees every key
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    if p > 0:
        rows = chunk_rows(batch, heads, n, n)
        keep = torch.cat([keep_mask(seed, part, (batch, heads, min(rows, n - start), n), p, "cpu")
                          for part, start in enumerate(range(0, n, rows))], dim=2)
        probs = probs * keep / (1 - p)
    return probs @ v


def _grads(out, leaves, weight):
    return torch.autograd.grad((out * weight).sum(), leaves)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_equals_the_dense_reference_with_the_same_masks(mask_name, causal):
    mask = MASKS[mask_name]
    q, k, v = make_qkv(batch=3, seq=45, seed=1, requires_grad=True)
    attn = build_small("full", dropout=0.3, causal=causal).train()
    torch.manual_seed(5)
    seed = draw_seed()  # the seed the module's forward will draw
    torch.manual_seed(5)
    out = attn(q, k, v, key_padding_mask=mask)
    assert attn.backend == "chunked"
    # The module zeroes padded q, k, v before attending; the reference gets the same inputs.
    zq, zk, zv = (t if mask is None else t.masked_fill(~mask[:, None, :, None], 0.0) for t in (q, k, v))
    expected = dense_masked_reference(zq, zk, zv, mask, causal, 0.3, seed)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    if mask is not None:
        weight = weight * mask[:, None, :, None]  # real rows only: padded rows may differ between paths
    torch.testing.assert_close(out * (weight != 0), expected * (weight != 0), atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, (q, k, v), weight), _grads(expected, (q, k, v), weight)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("mask_name", ["none", "right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_without_dropout_it_equals_sdpa(mask_name, causal):
    mask = MASKS[mask_name]
    q, k, v = make_qkv(batch=3, seq=45, seed=3, requires_grad=True)
    out = build_small("full", backend="chunked", causal=causal)(q, k, v, key_padding_mask=mask)
    ref_attn = build_small("full", backend="sdpa", causal=causal)
    expected = ref_attn(q, k, v, key_padding_mask=mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    if mask is not None:
        weight = weight * mask[:, None, :, None]
    torch.testing.assert_close(out * (weight != 0), expected * (weight != 0), atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(out, (q, k, v), weight), _grads(expected, (q, k, v), weight)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_pass_gradcheck_with_dropout_and_padding(causal, monkeypatch):
    monkeypatch.setattr(chunked_module, "CHUNK_ELEMENTS", 2 * 2 * 13 * 4)  # 4 rows per chunk, the last one short
    q, k, v = make_qkv(batch=2, seq=13, dim=4, seed=6, dtype=torch.float64, requires_grad=True)
    mask = right_padding_mask([13, 9], 13)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_attention(a, b, c, mask, causal, 0.25, 99), (q, k, v))


def test_dropout_is_real_and_the_same_seed_repeats():
    q, k, v = make_qkv(batch=2, seq=64, seed=7)
    attn = build_small("full", dropout=0.5).train()
    torch.manual_seed(0)
    a = attn(q, k, v)
    torch.manual_seed(0)
    assert torch.equal(a, attn(q, k, v))
    torch.manual_seed(1)
    assert not torch.allclose(a, attn(q, k, v))
    eval_out = attn.eval()(q, k, v)
    assert not torch.allclose(a, eval_out)
    # Inverted dropout: the expectation over masks is the eval output (mean of 200 draws, p = 0.5).
    attn.train()
    mean = torch.stack([attn(q, k, v) for _ in range(200)]).mean(0)
    # A draw's spread leaves ~7% here; a missing 1 / (1 - p) scaling would leave 50%.
    assert (mean - eval_out).abs().mean() < 0.2 * eval_out.abs().mean()


def test_dispatch_chooses_chunked_only_for_cpu_training_dropout():
    q, k, v = make_qkv(seq=9)
    cases = [({"dropout": 0.1}, True, "chunked"), ({"dropout": 0.1}, False, "sdpa"), ({}, True, "sdpa"),
             ({"dropout": 0.1, "recompute": False}, True, "sdpa"), ({"dropout": 0.1, "backend": "sdpa"}, True, "sdpa"),
             ({"dropout": 0.1, "backend": "reference"}, True, "reference"), ({"backend": "chunked"}, False, "chunked")]
    for params, training, expected in cases:
        attn = build_small("full", **params).train(training)
        attn(q, k, v)
        assert attn.backend == expected, (params, training)
    assert select_full_backend("auto", "cuda", torch.float16, True, cpu_train_dropout=True) == "xformers"
    assert select_full_backend("auto", "cuda", torch.float32, False, cpu_train_dropout=True) == "sdpa"
    assert select_full_backend("auto", "cpu", torch.float32, False, cpu_train_dropout=True) == "chunked"


def test_recompute_must_be_a_bool():
    with pytest.raises(ValueError, match="'recompute'"):
        build_small("full", recompute="yes")


def test_half_inputs_are_computed_in_float32():
    q, k, v = make_qkv(seq=20, seed=8)
    attn = build_small("full", backend="chunked")
    out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(*(t.bfloat16().float() for t in (q, k, v)))
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
