"""The fast-transformers pairs of reformer and clustered run at equal settings, checked from what they produce.

"Equal settings" is asserted from the peers' own computation, not from the arguments we pass: the number of
buckets their hash can produce (the width of the argmax they take) and the rounds they hash in, the number of
clusters their k-means returns counts for; against ours: the bucket count our rotations produce, the slots our
k-means fills. Skipped without fast-transformers (``pip install --no-deps`` its wheel; see README).
"""

from __future__ import annotations

import pytest
import torch

from attentions import build_attention
from harness import bench
from harness.bench import peers
from harness.bench.peers import installed

pytestmark = [pytest.mark.skipif(not installed("fast_transformers"), reason="fast-transformers not installed"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SETTINGS = {"smoke": True, "seq_lens": [64], "repeats": 1, "warmup": 1, "approx": {"enabled": False},
            "progress": False, "print_table": False, "passes": ["fwd+bwd"], "peers": {"seq_lens": [64]}}


def _inputs(n, heads=2, dim=8, batch=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_ft_reformer_hashes_into_our_bucket_count_for_our_rounds(causal, monkeypatch):
    n = 128
    settings = bench.resolve_settings({**SETTINGS, "causal": causal})
    ours = build_attention("reformer", num_heads=2, head_dim=8, max_seq_len=n, bucket_size=16, n_hashes=3,
                           causal=causal)
    peer = peers._ft_reformer_peer(ours.config, settings, n)
    widths = []
    argmax = torch.argmax

    def spy(x, *args, **kwargs):
        widths.append(x.shape[-1])
        return argmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "argmax", spy)
    q, _, v = _inputs(n, batch=settings.batch)
    out = peer(q, q, v)
    monkeypatch.undo()
    assert out.shape == q.shape and torch.isfinite(out).all()
    our_buckets = ours.hash(q)
    assert widths == [ours.num_buckets] * ours.config.n_hashes  # one hash per round, as many buckets as ours
    assert our_buckets.shape[2] == ours.config.n_hashes and int(our_buckets.max()) < ours.num_buckets
    assert 2 * ours.rotations.shape[-1] == ours.num_buckets == 8
    assert peer.attention.chunk_size == ours.config.bucket_size


@pytest.mark.parametrize("improved", [False, True])
def test_ft_clustered_fills_our_cluster_count_with_our_iterations(improved, monkeypatch):
    import fast_transformers.attention.clustered_attention as ft_clustered
    import fast_transformers.attention.improved_clustered_attention as ft_improved

    n = 64
    settings = bench.resolve_settings(SETTINGS)
    ours = build_attention("clustered", num_heads=2, head_dim=8, num_clusters=12, kmeans_iterations=4,
                           improved=improved, topk=5)
    build = peers._ft_improved_clustered_peer if improved else peers._ft_clustered_peer
    peer = build(ours.config, settings, n)
    module = ft_improved if improved else ft_clustered
    seen = []
    cluster = module.cluster

    def spy(hashes, lengths, **kwargs):
        groups, counts = cluster(hashes, lengths, **kwargs)
        seen.append((counts.shape[-1], kwargs["iterations"], int(counts.sum())))
        return groups, counts

    monkeypatch.setattr(module, "cluster", spy)
    q, k, v = _inputs(n, batch=settings.batch)
    assert torch.isfinite(peer(q, k, v)).all()
    _, slots = ours._cluster(q, torch.ones(settings.batch, n, dtype=torch.bool))
    assert seen == [(slots, ours.config.kmeans_iterations, settings.batch * 2 * n)]  # 12 clusters, every query
    if improved:
        assert peer.attention.topk == ours.config.topk


@pytest.mark.parametrize("causal", [False, True])
def test_hashing_pairs_run(causal, tmp_path):
    settings = bench.resolve_settings({**SETTINGS, "results_dir": str(tmp_path), "causal": causal,
                                       "mechanisms": ["reformer", "clustered"]})
    df = peers.run_peers(settings, log=lambda _: None)
    expected = {"reformer", "reformer_ft"} | (set() if causal else {"clustered_ft", "clustered_improved_ft"})
    assert set(df["pair"]) == expected
    # A peer that is not installed still has its cells, saying so (reformer-pytorch is optional beside ours).
    missing = set() if installed("reformer_pytorch") else {"reformer"}
    assert set(df[~df["pair"].isin(missing)]["status"]) == {"ok"}
    for reason in df[df["pair"].isin(missing)]["reason"]:
        assert reason.startswith("not installed: pip install reformer-pytorch")
