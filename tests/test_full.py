"""Exact attention: every backend equals the plain reference; the dispatch decision is tested on CPU."""

from __future__ import annotations

import pytest
import torch

import attentions.full as full_module
from attentions.full import select_full_backend
from attentions.functional import reference_attention

from conftest import build_small, make_qkv, right_padding_mask


def _dense_reference(q, k, v, mask=None):
    """Independent float64 softmax attention written out plainly."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).float()


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("padded", [False, True])
def test_backends_equal_reference(backend, padded):
    q, k, v = make_qkv(batch=3, seq=45, seed=11)
    mask = right_padding_mask([45, 30, 1], 45) if padded else None
    attn = build_small("full", backend=backend)
    out = attn(q, k, v, key_padding_mask=mask)
    expected = _dense_reference(q, k, v, mask)
    if mask is None:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        for b in range(3):
            torch.testing.assert_close(out[b][:, mask[b]], expected[b][:, mask[b]], atol=1e-5, rtol=1e-5)


def test_backend_is_recorded():
    attn = build_small("full")
    assert attn.backend == "not run yet"
    attn(*make_qkv(seq=5))
    assert attn.backend == "sdpa"  # CPU, no xformers
    ref = build_small("full", backend="reference")
    ref(*make_qkv(seq=5))
    assert ref.backend == "reference"


def test_all_padding_sequence_stays_finite():
    q, k, v = make_qkv(batch=2, seq=9)
    mask = right_padding_mask([9, 0], 9)
    for backend in ("sdpa", "reference"):
        out = build_small("full", backend=backend)(q, k, v, key_padding_mask=mask)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "requested,device,dtype,has_xformers,expected",
    [
        ("auto", "cpu", torch.float32, False, "sdpa"),
        ("auto", "cpu", torch.float32, True, "sdpa"),  # xformers kernels are CUDA-only
        ("auto", "cuda", torch.float16, True, "xformers"),
        ("auto", "cuda", torch.bfloat16, True, "xformers"),
        ("auto", "cuda", torch.float32, True, "xformers"),
        ("auto", "cuda", torch.float64, True, "sdpa"),  # dtype xformers does not take
        ("auto", "cuda", torch.float16, False, "sdpa"),  # extra not installed
        ("sdpa", "cuda", torch.float16, True, "sdpa"),
        ("reference", "cuda", torch.float16, True, "reference"),
        ("xformers", "cuda", torch.bfloat16, True, "xformers"),
    ],
)
def test_backend_dispatch(requested, device, dtype, has_xformers, expected):
    assert select_full_backend(requested, device, dtype, has_xformers) == expected


@pytest.mark.parametrize("device,has_xformers", [("cpu", True), ("cuda", False)])
def test_forced_xformers_unavailable_is_a_clear_error(device, has_xformers):
    with pytest.raises(ValueError, match="'backend'.*xformers"):
        select_full_backend("xformers", device, torch.float16, has_xformers)


def test_module_uses_the_single_dispatch(monkeypatch):
    """The module must route through select_full_backend (so recording and tests see one decision)."""
    calls = []

    def spy(requested, device_type, dtype, has_xformers, cpu_train_dropout=False):
        calls.append((requested, device_type, dtype, cpu_train_dropout))
        return "reference"

    monkeypatch.setattr(full_module, "select_full_backend", spy)
    attn = build_small("full")
    attn(*make_qkv(seq=6))
    # compute_dtype and attend both ask it (the chunked path computes half inputs in float32).
    assert calls and set(calls) == {("auto", "cpu", torch.float32, False)}
    assert attn.backend == "reference"


def test_dropout_only_in_training():
    q, k, v = make_qkv(seq=20)
    attn = build_small("full", dropout=0.5, backend="reference")
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), reference_attention(q, k, v))
    attn.train()
    torch.manual_seed(0)
    assert not torch.allclose(attn(q, k, v), reference_attention(q, k, v))
