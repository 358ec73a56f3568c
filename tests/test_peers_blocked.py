"""The sparse-pattern peers (harness/bench/peers.py) run at our settings: checked against the peer's own output.

Each test is skipped when its peer package is missing (the optional ``peers`` extra; fast-transformers is a
source build, see the README). "Equal settings" is asserted, never assumed: the peer's attention pattern (or
its output under the same projections) must be ours.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_sparse_patterns import bigbird_pattern, sliding_pattern

from attentions import build_attention
from harness.bench import peers
from harness.bench.peers import installed


def _qkv(n: int, heads: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, n, dim, generator=g) for _ in range(3))


@pytest.mark.skipif(not installed("local_attention"), reason="local-attention not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_peer_computes_our_band(causal):
    # n a multiple of the peer's block (window // 2), as the pair's divisor requires: no zero keys padded in.
    ours = build_attention("sliding_window", num_heads=2, head_dim=8, window=8, causal=causal)
    peer = peers._local_attention_peer(ours.config, SimpleNamespace(causal=causal), 36)
    pair = next(p for p in peers.PAIRS if p.key == "sliding_window")
    assert 36 % pair.divisor(ours.config) == 0
    q, k, v = _qkv(36, 2, 8)
    torch.testing.assert_close(peer(q, k, v), ours(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not installed("fast_transformers"), reason="fast-transformers not installed")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [6, 8])
def test_fast_transformers_local_context_is_our_window_plus_one(causal, window):
    # One-hot values make the output the attention matrix itself: its support is the peer's pattern.
    n = 24
    ours = build_attention("sliding_window", num_heads=1, head_dim=n, window=window, causal=causal)
    peer = peers._fast_transformers_local_peer(ours.config, SimpleNamespace(causal=causal), n)
    assert peer.attention.local_context == window + 1
    q, k = torch.randn(2, 1, 1, n, n, generator=torch.Generator().manual_seed(1)).unbind(0)
    v = torch.eye(n)[None, None]
    weights = peer(q, k, v)[0, 0]
    expected = sliding_pattern(n, window)
    if causal:
        expected &= torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(weights > 0, expected)
    torch.testing.assert_close(weights, ours(q, k, v)[0, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not installed("transformers"), reason="transformers not installed")
def test_hf_longformer_peer_is_ours_under_its_projections():
    # With the peer's global projections tied to its local ones (ours has one set), the peer's output is ours
    # on its projected q, k, v: the same band (attention_window = window) and the same global tokens.
    n, heads, dim = 32, 2, 4
    ours = build_attention("longformer", num_heads=heads, head_dim=dim, window=8, global_positions=(0, 5))
    peer = peers._hf_longformer_peer(ours.config, SimpleNamespace(heads=heads, head_dim=dim), n).eval()
    layer = peer.attention
    assert layer.one_sided_attn_window_size == ours.config.window // 2
    with torch.no_grad():
        for glob, local in ((layer.query_global, layer.query), (layer.key_global, layer.key),
                            (layer.value_global, layer.value)):
            glob.weight.copy_(local.weight)
            glob.bias.copy_(local.bias)
    x = torch.randn(2, n, heads * dim, generator=torch.Generator().manual_seed(2))

    def split(t):
        return t.view(2, n, heads, dim).transpose(1, 2)

    want = ours(split(layer.query(x)), split(layer.key(x)), split(layer.value(x)))
    want = peer.to_out(want.transpose(1, 2).reshape(2, n, heads * dim))  # the output projection around both
    torch.testing.assert_close(peer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not installed("transformers"), reason="transformers not installed")
def test_hf_bigbird_peer_reads_as_many_blocks_per_row_as_ours():
    # The peer's global blocks are its first and last (ours: the first two), its random blocks its own draw:
    # equal settings are block size, 2 global blocks, r random blocks and the 3-block band, so every row that
    # is not global reads the same number of keys: (3 + 2 + r) blocks, and a global row all n.
    n, heads, dim, block, r = 64, 2, 4, 4, 2
    pair = next(p for p in peers.PAIRS if p.key == "bigbird")
    ours = build_attention("bigbird", num_heads=heads, head_dim=dim, block_size=block, num_random_blocks=r,
                           max_seq_len=n, **pair.ours_params)
    peer = pair.build_peer(ours.config, SimpleNamespace(heads=heads, head_dim=dim), n).eval()
    assert peer.attention.training  # its random blocks exist only in training mode
    assert (peer.attention.block_size, peer.attention.num_random_blocks) == (block, r)
    x = torch.randn(1, n, heads * dim, generator=torch.Generator().manual_seed(3))
    b = x.shape[0]
    probs = peer.attention(x, band_mask=peer.band.expand(b, -1, -1, -1, -1),
                           from_mask=peer.from_mask.expand(b, -1, -1, -1), to_mask=peer.to_mask.expand(b, -1, -1, -1),
                           from_blocked_mask=peer.blocked.expand(b, -1, -1),
                           to_blocked_mask=peer.blocked.expand(b, -1, -1), output_attentions=True)[1]
    peer_keys = (probs[0] > 0).sum(dim=-1)  # (heads, n)
    our_keys = bigbird_pattern(n, block, 2, ours.random_blocks).sum(dim=-1)
    # Rows of blocks 3 .. nb - 3 in both: away from the global blocks and their neighbours.
    middle = slice(3 * block, n - 3 * block)
    assert set(peer_keys[:, middle].unique().tolist()) == {(3 + 2 + r) * block}
    assert set(our_keys[middle].unique().tolist()) == {(3 + 2 + r) * block}
    assert (peer_keys[:, :block] == n).all() and (our_keys[:2 * block] == n).all()


@pytest.mark.skipif(not all(installed(p) for p in ("local_attention", "fast_transformers", "transformers")),
                    reason="peers not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_sparse_pattern_pairs_run_in_the_benchmark(tmp_path, causal):
    from harness import bench

    settings = bench.resolve_settings({"smoke": True, "results_dir": str(tmp_path), "causal": causal,
                                       "passes": ["fwd+bwd"], "repeats": 1, "warmup": 0, "progress": False,
                                       "mechanisms": ["sliding_window", "longformer", "bigbird"],
                                       "peers": {"seq_lens": [64]}})
    df = peers.run_peers(settings, log=lambda _: None)
    expected = {"sliding_window", "sliding_window_ft"} | (set() if causal else {"longformer", "bigbird"})
    assert set(df["pair"]) == expected
    assert set(df["status"]) == {"ok"}, df[["pair", "status", "reason"]]
