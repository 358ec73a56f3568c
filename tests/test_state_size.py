"""State size (``AttentionInfo.state_size``): each declaration against an independent count.

Exact-sparse mechanisms (full, sliding_window, longformer, bigbird, reformer, clustered, aft full): the
gradient of one query's output with respect to ``k`` and ``v``; a position with a non-zero gradient is read,
so the floats read are ``2 head_dim`` per such position, maximised over the (non-global) queries.
Mechanisms that read summaries (linformer, memory_compressed, performer, rfa, aft simple/local): the shapes
their implementation hands to the attention step.
"""

from __future__ import annotations

import pytest
import torch

import attentions.linformer as linformer_module
import attentions.memory_compressed as mc_module
import attentions.performer as performer_module
import attentions.rfa as rfa_module
from attentions import Attention, AttentionConfig, available_attentions, build_attention, get_attention_info
from attentions import registry as attention_registry
from attentions.aft import _simple_context

D = 4  # head_dim: small, the counts scale with it


def declared(name: str, n: int, **params) -> int:
    return get_attention_info(name).state_size({"head_dim": D, "num_heads": 1, **params}, n)


def read_counts(name: str, n: int, **params) -> list[int]:
    """Per query position: ``2 D`` floats (its key and value) per position whose ``k`` or ``v`` has a non-zero
    gradient. The union, because these mechanisms read a key and its value together, and a read key's
    gradient can vanish (a softmax over one key does not depend on its score)."""
    torch.manual_seed(0)
    attn = build_attention(name, num_heads=1, head_dim=D, **params).double()
    q, k, v = (torch.randn(1, 1, n, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    # k apart from q also for Reformer (its buckets come from q, its keys from k): tied, the query's own
    # position would count through q_i.
    out = attn(q, k, v)
    probe = torch.randn(D, dtype=torch.float64)
    counts = []
    for i in range(n):
        gk, gv = torch.autograd.grad(out[0, 0, i] @ probe, (k, v), retain_graph=True)
        read = ((gk[0, 0] != 0) | (gv[0, 0] != 0)).any(-1)
        counts.append(2 * D * int(read.sum()))
    return counts


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 13, 32])
def test_full_reads_the_whole_kv_cache(n, causal):
    assert declared("full", n, causal=causal) == 2 * n * D == max(read_counts("full", n, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 2, 5, 8, 40])
@pytest.mark.parametrize("n", [6, 21])
def test_sliding_window_reads_its_band(n, window, causal):
    params = {"window": window, "causal": causal}
    assert declared("sliding_window", n, **params) == max(read_counts("sliding_window", n, **params))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("globals_", [(), (0,), (0, 5), (3, 30), (2, 10, 11)])
def test_longformer_reads_band_and_globals(globals_, causal):
    n, params = 33, {"window": 6, "global_positions": globals_, "causal": causal}
    counts = read_counts("longformer", n, **params)
    local = [c for i, c in enumerate(counts) if i not in globals_]
    assert declared("longformer", n, **params) == max(local)
    if globals_ and not causal:
        assert max(counts) == 2 * n * D  # a global query reads everything: the reason globals are left out


def test_longformer_with_every_position_global_is_full():
    params = {"window": 2, "global_positions": (0, 1, 2)}
    assert declared("longformer", 3, **params) == 2 * 3 * D == max(read_counts("longformer", 3, **params))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "blocks"), [(32, (4, 1, 2)), (30, (4, 1, 2)), (40, (4, 2, 1)), (40, (5, 0, 3))])
def test_bigbird_reads_band_globals_and_random_blocks(n, blocks, seed, causal):
    block, glob, rand = blocks
    params = {"block_size": block, "num_global_blocks": glob, "num_random_blocks": rand, "seed": seed,
              "causal": causal, "max_seq_len": 40}
    counts = read_counts("bigbird", n, **params)
    assert declared("bigbird", n, **params) == max(counts[glob * block:])


def test_bigbird_with_every_block_global_is_full():
    params = {"block_size": 8, "num_global_blocks": 2, "num_random_blocks": 1, "max_seq_len": 16}
    assert declared("bigbird", 12, **params) == 2 * 12 * D == max(read_counts("bigbird", 12, **params))


@pytest.mark.parametrize(("causal", "extra"), [(False, {}), (True, {"num_buckets": 2})])
@pytest.mark.parametrize("n", [16, 32])
def test_reformer_single_round_reaches_its_capacity(n, causal, extra):
    # One round across buckets (bidirectional): every query past the first chunk reads 2c - 1 keys. Causal
    # with 2 buckets: some bucket holds > c tokens, whose last reads its c predecessors.
    params = {"bucket_size": 4, "n_hashes": 1, "causal": causal, "max_seq_len": 32, **extra}
    assert declared("reformer", n, **params) == max(read_counts("reformer", n, **params))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 3, 24])
def test_reformer_rounds_never_read_more_than_the_capacity(n, causal):
    params = {"bucket_size": 4, "n_hashes": 3, "causal": causal, "max_seq_len": 32}
    counts = read_counts("reformer", n, **params)
    assert max(counts) <= declared("reformer", n, **params)
    assert declared("reformer", n, **params) == 2 * D * max(1, min(n - 1, 3 * (4 if causal else 7)))


@pytest.mark.parametrize("improved", [False, True])
def test_clustered_reads_every_key(improved):
    params = {"num_clusters": 3, "improved": improved, "topk": 4}
    assert declared("clustered", 20, **params) == 2 * 20 * D == max(read_counts("clustered", 20, **params))
    assert min(read_counts("clustered", 20, **params)) == 2 * 20 * D  # every query, not only the largest


@pytest.mark.parametrize("causal", [False, True])
def test_aft_full_reads_every_key(causal):
    params = {"mode": "full", "max_seq_len": 16, "causal": causal}
    assert declared("aft", 16, **params) == 2 * 16 * D == max(read_counts("aft", 16, **params))


# ------------------------------------------------------------------------- mechanisms that read summaries


def _record_calls(monkeypatch, module, attr: str) -> list[tuple]:
    """Replace ``module.attr`` by a wrapper that records its positional arguments."""
    calls, original = [], getattr(module, attr)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attr, spy)
    return calls


def _run(name: str, n: int, **params) -> None:
    attn = build_attention(name, num_heads=1, head_dim=D, **params)
    q, k, v = (torch.randn(1, 1, n, D) for _ in range(3))
    attn(q, k, v)


@pytest.mark.parametrize("sharing", ["none", "kv"])
@pytest.mark.parametrize("n", [5, 30])
def test_linformer_reads_the_projected_slots(monkeypatch, n, sharing):
    calls = _record_calls(monkeypatch, linformer_module.F, "scaled_dot_product_attention")
    _run("linformer", n, proj_dim=8, sharing=sharing, max_seq_len=32)
    (_, k_proj, v_proj), = calls
    assert declared("linformer", n, proj_dim=8, sharing=sharing, max_seq_len=32) == k_proj[0, 0].numel() + \
        v_proj[0, 0].numel() == 2 * 8 * D


@pytest.mark.parametrize(("n", "c"), [(20, 3), (21, 3), (12, 1), (7, 10)])
def test_memory_compressed_reads_the_slots(monkeypatch, n, c):
    calls = _record_calls(monkeypatch, mc_module.F, "scaled_dot_product_attention")
    _run("memory_compressed", n, compression=c)
    (_, k_slots, v_slots), = calls
    assert declared("memory_compressed", n, compression=c) == k_slots[0, 0].numel() + v_slots[0, 0].numel()


@pytest.mark.parametrize(("n", "c"), [(20, 3), (21, 3), (12, 1), (7, 10), (40, 8), (41, 8)])
def test_causal_memory_compressed_reads_past_slots_and_own_block(monkeypatch, n, c):
    calls = _record_calls(monkeypatch, mc_module.blk, "masked_attention")
    _run("memory_compressed", n, compression=c, causal=True)
    # Each call: queries of a piece, keys = [slots of past blocks, tokens of the piece], and the allowed pairs.
    most = max(int(allowed.sum(-1).max()) for _, _, _, allowed, *_ in calls)
    assert declared("memory_compressed", n, compression=c, causal=True) == 2 * D * most


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_performer_reads_its_feature_sums(monkeypatch, kernel, causal):
    name = "linear_attention"
    if causal:
        name = "causal_exp_linear_attention" if kernel == "softmax" else "causal_linear_attention"
    calls = _record_calls(monkeypatch, performer_module, name)
    # The stored path's call shows the sums; the recomputing default keeps the same (m, d + 1) sums.
    _run("performer", 24, num_features=6, kernel=kernel, causal=causal, recompute=False)
    (_, phi_k, v, *_), = calls
    # phi(K)^T [V, 1]: one (m, d + 1) matrix whatever n.
    assert declared("performer", 24, num_features=6, kernel=kernel, causal=causal) == \
        phi_k.shape[-1] * (v.shape[-1] + 1) == 6 * (D + 1)


@pytest.mark.parametrize("causal", [False, True])
def test_rfa_reads_its_sin_cos_feature_sums(monkeypatch, causal):
    calls = _record_calls(monkeypatch, rfa_module, "causal_linear_attention" if causal else "linear_attention")
    _run("rfa", 24, num_features=5, causal=causal, recompute=False)  # the stored path's call (as performer's)
    (_, phi_k, v, *_), = calls
    features = sum(part.shape[-1] for part in phi_k)  # (sin, cos): 2 D features
    assert declared("rfa", 24, num_features=5, causal=causal) == features * (v.shape[-1] + 1) == 2 * 5 * (D + 1)


def test_aft_simple_reads_one_context_vector():
    attn = build_attention("aft", num_heads=1, head_dim=D, mode="simple").double()
    q, k, v = (torch.randn(1, 1, 15, D, dtype=torch.float64) for _ in range(3))
    context = _simple_context(k, v, None)  # (1, 1, 1, D): the same for every query
    torch.testing.assert_close(attn(q, k, v), torch.sigmoid(q) * context)
    assert declared("aft", 15, mode="simple") == context[0, 0].numel() == D


def test_causal_aft_simple_reads_two_prefix_sums():
    attn = build_attention("aft", num_heads=1, head_dim=D, mode="simple", causal=True).double()
    q, k, v = (torch.randn(1, 1, 15, D, dtype=torch.float64) for _ in range(3))
    num, den = (torch.exp(k) * v).cumsum(2), torch.exp(k).cumsum(2)  # per query: D + D floats
    torch.testing.assert_close(attn(q, k, v), torch.sigmoid(q) * num / den)
    assert declared("aft", 15, mode="simple", causal=True) == 2 * D


def _aft_local_output(attn, k, v, t: int, swap: tuple[int, int]) -> torch.Tensor:
    k, v = k.clone(), v.clone()
    a, b = swap
    k[:, :, [a, b]], v[:, :, [a, b]] = k[:, :, [b, a]], v[:, :, [b, a]]
    q = torch.zeros_like(k)
    return attn(q, k, v)[0, 0, t]


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_reads_the_window_and_one_summary_of_the_rest(causal):
    """Keys outside the window enter through one sum: exchanging two of them (a prefix and a suffix one when
    bidirectional) leaves the query's output as it was; exchanging one with a window key changes it."""
    n, s = 20, 3
    attn = build_attention("aft", num_heads=1, head_dim=D, mode="local", window=s, causal=causal,
                           bias_init_std=0.5).double()
    k, v = (torch.randn(1, 1, n, D, dtype=torch.float64) for _ in range(2))
    t = n - 1 if causal else 10
    window = [j for j in range(n) if -s < j - t <= (0 if causal else s - 1)]
    outside = [j for j in range(n) if j not in window and (j <= t or not causal)]
    base = _aft_local_output(attn, k, v, t, (t, t))
    torch.testing.assert_close(_aft_local_output(attn, k, v, t, (outside[0], outside[-1])), base)
    assert not torch.allclose(_aft_local_output(attn, k, v, t, (window[0], outside[-1])), base)
    assert declared("aft", n, mode="local", window=s, causal=causal) == 2 * D * (len(window) + 1)


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_window_wider_than_the_input_reads_every_key(causal):
    assert declared("aft", 5, mode="local", window=3, causal=causal) == 2 * D * (4 if causal else 5)
    assert declared("aft", 3, mode="local", window=32, causal=causal) == 2 * D * 3


# ------------------------------------------------------------------------------------- the API and errors


def test_every_builtin_mechanism_declares_a_state_size():
    for name in available_attentions():
        assert get_attention_info(name).state_size_fn is not None, name


@pytest.mark.parametrize("seq_len", [0, -3, 2.5, True, "8", None])
def test_invalid_seq_len_is_a_value_error(seq_len):
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        get_attention_info("full").state_size({"head_dim": D}, seq_len)


def test_bad_params_are_value_errors_naming_them():
    info = get_attention_info("sliding_window")
    with pytest.raises(ValueError, match="head_dim"):
        info.state_size({"window": 4}, 8)
    with pytest.raises(ValueError, match="unknown parameter.*'windo'"):
        info.state_size({"head_dim": D, "windo": 4}, 8)
    with pytest.raises(ValueError, match="invalid parameter 'window'"):
        info.state_size({"head_dim": D, "window": 0}, 8)
    with pytest.raises(ValueError, match="seq_len 65 exceeds max_seq_len=64"):
        info.state_size({"head_dim": D, "window": 4, "max_seq_len": 64}, 65)
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        get_attention_info("nope")


@pytest.fixture
def plugin():
    """Registers a throwaway mechanism with the given state-size hook; removes it afterwards."""
    names = []

    def register(name, hook):
        class Plugin(Attention):
            def attend(self, q, k, v, key_padding_mask):
                return v

        names.append(name)
        extra = {} if hook is None else {"state_size_fn": hook}
        attention_registry.register_attention(name, config=AttentionConfig, family="exact",
                                              time_complexity="O(n)", memory_complexity="O(n)", **extra)(Plugin)
        return get_attention_info(name)

    yield register
    for name in names:
        attention_registry._REGISTRY.pop(name, None)


def test_plugin_without_a_declaration_has_none(plugin):
    assert plugin("_no_state", None).state_size({"head_dim": D}, 8) is None
    assert plugin("_none_state", lambda config, n: None).state_size({"head_dim": D}, 8) is None
    assert plugin("_own_state", lambda config, n: 3 * config.head_dim).state_size({"head_dim": D}, 8) == 3 * D


@pytest.mark.parametrize("bad", [0, -1, 2.5, "12", True])
def test_a_declaration_returning_a_non_count_is_a_type_error(plugin, bad):
    info = plugin("_bad_state", lambda config, n: bad)
    with pytest.raises(TypeError, match="'_bad_state' must be None or an int >= 1"):
        info.state_size({"head_dim": D}, 8)
