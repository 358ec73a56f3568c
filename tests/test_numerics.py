"""Numerical robustness of every registered mechanism (issue 11).

- Non-finite padding: NaN and +-inf standing in padded q, k or v change neither the real rows
  nor the gradients of the real inputs.
- Input scale: fp32 agrees with the same module evaluated in float64 (``module.double()``).
- Reduced precision: bf16/fp16 inputs stay within a bound of SDPA's own error against float64.
- Discrete structure (LSH buckets, k-means clusters, top-k keys) does not depend on the dtype.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attentions import available_attentions, build_attention, get_attention_info

from conftest import build_small, make_qkv, right_padding_mask

MECHANISMS = available_attentions()


def _float64_twin(attn: torch.nn.Module) -> torch.nn.Module:
    """The same module (same parameters, buffers, random features) in float64."""
    return copy.deepcopy(attn).double()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", MECHANISMS)
def test_nonfinite_padding_leaks_into_nothing_real(name, value):
    attn = build_small(name).eval()
    seq = 20
    mask = right_padding_mask([20, 13], seq)
    pad = ~mask[:, None, :, None]
    clean = make_qkv(batch=2, seq=seq, seed=6)
    for target in range(3):  # poison q, then k, then v
        runs = []
        for poison in (False, True):
            inputs = [t.clone().requires_grad_(True) for t in clean]
            fed = list(inputs)
            if poison:
                fed[target] = torch.where(pad, torch.full_like(fed[target], value), fed[target])
            out = attn(*fed, key_padding_mask=mask)
            real_out = out[1, :, :13]
            (torch.cat([out[0].flatten(), real_out.flatten()]).square().sum()).backward()
            runs.append((torch.cat([out[0].flatten(), real_out.flatten()]).detach(),
                         [t.grad for t in inputs]))
        (ref_out, ref_grads), (got_out, got_grads) = runs
        label = f"{name}: {value} in padded {'qkv'[target]}"
        assert torch.isfinite(got_out).all(), label
        torch.testing.assert_close(got_out, ref_out, atol=1e-5, rtol=1e-4, msg=lambda m: f"{label}: {m}")
        for which, (g_ref, g_got) in enumerate(zip(ref_grads, got_grads)):
            assert torch.isfinite(g_got).all(), f"{label}: grad of {'qkv'[which]} not finite"
            assert g_got[1, :, 13:].abs().max() == 0, f"{label}: padded {'qkv'[which]} gets a gradient"
            torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("target", ["k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_full_issue_example_nonfinite_padded_key_or_value(backend, target, value):
    # Issue 11, fault 1: q = k = [1, 0], v = [2, 0], second position padded; the real row is 2.
    attn = build_attention("full", num_heads=1, head_dim=1, backend=backend)
    q = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    k, v = q.clone(), torch.tensor([2.0, 0.0]).view(1, 1, 2, 1)
    (k if target == "k" else v)[0, 0, 1, 0] = value
    out = attn(q, k, v, key_padding_mask=torch.tensor([[True, False]]))
    assert out[0, 0, 0, 0].item() == 2.0
