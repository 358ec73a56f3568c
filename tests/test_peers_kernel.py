"""The rfa pair with fast-transformers (linear attention + RandomFourierFeatures): equal settings asserted by the
produced feature counts, and the pair runs in both patterns. Skipped when fast-transformers is not installed."""

from __future__ import annotations

import pytest
import torch

from attentions import build_attention
from harness.bench.peers import PAIRS

pytest.importorskip("fast_transformers")


class _Settings:
    heads, head_dim = 2, 8

    def __init__(self, causal: bool) -> None:
        self.causal = causal


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_features", [16, 64])
def test_rfa_pair_produces_as_many_features_as_ours(num_features, causal):
    pair = next(p for p in PAIRS if p.key == "rfa")
    assert pair.patterns == ("bidirectional", "causal")
    ours = build_attention("rfa", num_heads=2, head_dim=8, num_features=num_features, causal=causal)
    q = torch.randn(1, 2, 5, 8)
    produced = sum(part.shape[-1] for part in ours.feature_maps(q, q)[0])  # (sin, cos): 2 per frequency
    peer = pair.build_peer(ours.config, _Settings(causal), 5)
    assert produced == 2 * num_features == peer.produced_features()
    out = peer(q, q, q)
    assert out.shape == q.shape and torch.isfinite(out).all()
