"""Peers: the public PyPI implementations measured side by side with ours (the optional ``peers`` extra).

Each pair runs at equal settings (the peer is built from *our* config: features, projection
length, bucket size and hashes, compression) on the same inputs, and the benchmark reports
ours/peer ratios of time and peak memory. Two levels of comparison, named in every record:

- ``core``: the peer exposes the attention alone, called on the same projected
  ``q, k, v`` as ours (performer-pytorch ``FastAttention``, reformer-pytorch ``LSHAttention``
  with ``qk = q`` since it shares queries and keys, as ours does, local-attention ``LocalAttention``,
  fast-transformers ``ReformerAttention``, ``ClusteredAttention`` and ``ImprovedClusteredAttention`` through
  :class:`FastTransformersCore`, which holds their mask objects and transposes to their layout).
- ``layer``: the peer owns its Q/K/V and output projections (linformer
  ``LinformerSelfAttention``, memory-compressed-attention ``MemoryCompressedAttention``,
  aft-pytorch ``AFTFull``/``AFTSimple``); ours is then wrapped in the same projections
  (:class:`ProjectedAttention`: bias-free Q/K/V, output with bias) and both take ``x``
  of shape ``(batch, n, heads * head_dim)``.

Causal runs (``arena-bench causal=true``) measure the pairs whose peer has a causal form:
performer-pytorch ``FastAttention(causal=True)`` and local-attention ``LocalAttention(causal=True)``
(window ``window // 2`` to the left, exact, as our causal ``sliding_window``), reformer-pytorch
``LSHAttention(causal=True)`` and fast-transformers ``ReformerAttention`` with a ``TriangularCausalMask`` (both
mask later positions inside the chunk windows: the paper's mask, looser than ours); every record names
its ``pattern``.

aft-pytorch's ``AFTLocal`` is not compared: it rebuilds its ``max_seqlen x max_seqlen`` bias
with a Python double loop on every call (minutes at n = 1024), which would measure the loop.

A pair whose peer is not installed gets its cells all the same, each ``unsupported`` with the reason "not
installed" and the pip command (``peer_installed: false``; measured once the peer is there). Ours and the peer
are timed in interleaved rounds; every record carries the fairness-protocol fields (docs/FAIRNESS.md).

Owns: the pairs, their equal settings and the ``peer`` records. Imports: ``attentions``,
:mod:`harness.measure` (the same measured step as every cell), :mod:`harness.store`,
:mod:`harness.bench.cells`, :mod:`harness.bench.settings`; never the benchmark's runner.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from attentions import available_attentions, build_attention
from harness.bench.cells import make_inputs, mechanism_params, select_mechanisms
from harness.bench.protocol import LAYER, PROJECTED, mask_text, module_settings, package_version, protocol
from harness.bench.settings import BenchSettings
from harness.measure import DTYPES, failure_outcome, jsonable_params, make_step, progress_bar, step_peak, time_rounds
from harness.store import config_hash, find_record, now_iso, write_record


class ProjectedAttention(nn.Module):
    """Our mechanism inside Q/K/V (no bias) and output (bias) projections, the layout of the layer-level peers."""

    def __init__(self, attention: nn.Module, heads: int, head_dim: int) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        out = self.attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


@dataclass(frozen=True)
class PeerPair:
    """One comparison: our ``mechanism`` (with ``ours_params`` on top of the benchmark's) vs ``peer``."""

    key: str
    mechanism: str
    package: str  # import name of the peer's distribution
    peer: str  # what is called, for the output
    level: str  # "core" or "layer"
    build_peer: Callable[[Any, dict, int], nn.Module]  # (our config, settings, n) -> peer module
    ours_params: dict | None = None
    divisor: Callable[[Any], int] | None = None  # n must be a multiple of this (peer's constraint)
    patterns: tuple[str, ...] = ("bidirectional",)  # the attention patterns (arena-bench causal=...) it runs in
    distribution: str | None = None  # the peer's PyPI name where it is not ``package`` with '-' for '_'
    # What the peer is handed, where it differs from ours (docs/FAIRNESS.md): its input layout, and its masks
    # (which mask objects, whether built inside the measured step, whether materialised n x n).
    peer_layout: str | None = None
    peer_masks: str | None = None

    @property
    def pip_name(self) -> str:
        """The distribution to ``pip install`` for this peer."""
        return self.distribution or self.package.replace("_", "-")


def _performer_peer(cfg, settings, n):
    from performer_pytorch import FastAttention

    return FastAttention(dim_heads=settings.head_dim, nb_features=cfg.num_features, causal=settings.causal)


class FastTransformersLinear(nn.Module):
    """fast-transformers' ``LinearAttention`` (``CausalLinearAttention`` when causal) with
    ``RandomFourierFeatures``, called on our ``(batch, heads, n, head_dim)`` layout.

    Equal settings with our ``rfa``: the same number of features *produced*. Ours counts frequencies
    (``num_features = D`` gives ``2 D`` features, sin and cos); theirs counts features (``n_dims = 2 D``,
    ``D`` frequencies, cos and sin): ``n_dims = 2 * num_features`` (asserted in tests/test_peers_kernel.py
    by the feature maps' output widths). Their frequencies are drawn once (``deterministic_eval``: no
    redraw per call, as ours).

    What differs (the maths, not the settings): ours l2-normalises queries and keys and uses frequencies
    ``N(0, sigma^-2 I)`` (``sigma = 1``), so it estimates ``softmax(q^ . k^ / sigma^2)``; theirs does not
    normalise and scales the inputs by ``sqrt(softmax_temp)`` (default ``1 / sqrt(d)``), so it estimates
    the Gaussian kernel ``exp(-|q - k|^2 / (2 sqrt(d)))`` of the raw vectors. Their denominator is
    ``1 / (phi(q) . sum phi(k) + 1e-6)``, not clamped (a sin/cos estimate can be negative or near zero);
    ours is clamped at the lowest possible kernel sum. Their inputs are ``(batch, n, heads, dim)``: ours
    are handed over as transposed views (no copy), and the output transposed back.
    """

    def __init__(self, head_dim: int, num_features: int, causal: bool) -> None:
        super().__init__()
        from fast_transformers.attention import CausalLinearAttention, LinearAttention
        from fast_transformers.feature_maps import RandomFourierFeatures

        def feature_map(dims: int) -> RandomFourierFeatures:
            return RandomFourierFeatures(dims, n_dims=2 * num_features, deterministic_eval=True)

        attention = CausalLinearAttention if causal else LinearAttention
        self.inner = attention(head_dim, feature_map=feature_map)
        self.inner.feature_map.new_feature_map("cpu")  # draw the frequencies once (they start at zero; .to moves them)
        self.causal = causal
        self._masks: dict = {}

    def produced_features(self) -> int:
        """Width of the feature map's output (the count our ``2 * num_features`` is held to)."""
        fmap = self.inner.feature_map
        return fmap(torch.zeros(1, fmap.query_dimensions, device=fmap.omega.device)).shape[-1]

    def _masks_for(self, batch: int, n: int, device: torch.device):
        from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

        key = (batch, n, str(device))
        if key not in self._masks:
            attn_mask = TriangularCausalMask(n, device=device) if self.causal else FullMask(n, device=device)
            lengths = LengthMask(torch.full((batch,), n, dtype=torch.long, device=device), device=device)
            self._masks[key] = (attn_mask, lengths)
        return self._masks[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        attn_mask, lengths = self._masks_for(b, n, q.device)
        out = self.inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, lengths, lengths)
        return out.transpose(1, 2)


def _rfa_fourier_peer(cfg, settings, n):
    return FastTransformersLinear(settings.head_dim, cfg.num_features, settings.causal)


def _local_attention_peer(cfg, settings, n):
    from local_attention import LocalAttention

    # Blocks of window // 2, one look-back block (and one look-ahead block when bidirectional), exact window:
    # query i sees keys i - window // 2 .. i (causal) or .. i + window // 2, as ours; no rotary embedding
    # (ours has none).
    return LocalAttention(window_size=cfg.window // 2, causal=settings.causal, look_backward=1,
                          look_forward=0 if settings.causal else 1, exact_windowsize=True, autopad=True,
                          use_rotary_pos_emb=False)


def _reformer_peer(cfg, settings, n):
    from reformer_pytorch import LSHAttention

    # causal: reformer-pytorch masks later positions inside the chunk windows (the paper's language-model mask).
    return LSHAttention(bucket_size=cfg.bucket_size, n_hashes=cfg.n_hashes, causal=settings.causal)


class FastTransformersCore(nn.Module):
    """A fast-transformers attention called in our layout: ``(b, h, n, d)`` in and out (their ``(b, n, h, d)`` is a
    transposed view each way). Its mask objects are built here, once per pair and length, as a model built for one
    length would hold them: ``FullMask(n)`` (all ones: skipped by their attention) or ``TriangularCausalMask(n)``
    (causal), and a ``LengthMask`` saying every sequence is ``n`` long. Their lazily cached matrices are filled
    here too, so that no measured step pays for them."""

    def __init__(self, attention: nn.Module, batch: int, n: int, causal: bool = False) -> None:
        from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

        super().__init__()
        self.attention = attention
        self.attn_mask = TriangularCausalMask(n) if causal else FullMask(n)
        self.lengths = LengthMask(torch.full((batch,), n, dtype=torch.long), max_len=n)
        for mask in (self.attn_mask, self.lengths):
            mask.additive_matrix, mask.float_matrix, mask.all_ones  # noqa: B018 - fills their caches

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attn_mask, self.lengths,
                             self.lengths)
        return out.transpose(1, 2)


def _ft_reformer_peer(cfg, settings, n):
    from fast_transformers.attention import ReformerAttention

    # Equal settings: chunk = our bucket, rounds = our hashes, and 2 * bits buckets (argmax over [xR; -xR], as
    # ours) = our bucket count. Their `masked=False` default (the self pair is not demoted; `masked=True` adds an
    # n x n matrix to every call). Causal: their attention takes the triangular mask as an n x n additive matrix.
    attention = ReformerAttention(chunk_size=cfg.bucket_size, bits=cfg.resolved_num_buckets // 2, rounds=cfg.n_hashes,
                                  attention_dropout=cfg.dropout)
    return FastTransformersCore(attention, settings.batch, n, causal=settings.causal)


def _ft_clustered_peer(cfg, settings, n):
    from fast_transformers.attention import ClusteredAttention

    # Equal settings: clusters and Lloyd iterations; their hash keeps its default 32 bits (LSH codes + Hamming
    # k-means in C++, the paper's clustering; ours is Euclidean k-means on the queries).
    attention = ClusteredAttention(clusters=cfg.num_clusters, iterations=cfg.kmeans_iterations,
                                   attention_dropout=cfg.dropout)
    return FastTransformersCore(attention, settings.batch, n)


def _ft_improved_clustered_peer(cfg, settings, n):
    from fast_transformers.attention import ImprovedClusteredAttention

    attention = ImprovedClusteredAttention(clusters=cfg.num_clusters, iterations=cfg.kmeans_iterations, topk=cfg.topk,
                                           attention_dropout=cfg.dropout)
    return FastTransformersCore(attention, settings.batch, n)


def _linformer_peer(cfg, settings, n):
    from linformer import LinformerSelfAttention

    dim = settings.heads * settings.head_dim
    return LinformerSelfAttention(dim=dim, seq_len=n, k=cfg.proj_dim, heads=settings.heads,
                                  dim_head=settings.head_dim)


def _memory_compressed_peer(cfg, settings, n):
    from memory_compressed_attention import MemoryCompressedAttention

    dim = settings.heads * settings.head_dim
    return MemoryCompressedAttention(dim=dim, heads=settings.heads, compression_factor=cfg.compression)


def _aft_full_peer(cfg, settings, n):
    from aft_pytorch import AFTFull

    dim = settings.heads * settings.head_dim
    return AFTFull(max_seqlen=n, dim=dim, hidden_dim=dim)


def _aft_simple_peer(cfg, settings, n):
    from aft_pytorch import AFTSimple

    dim = settings.heads * settings.head_dim
    return AFTSimple(max_seqlen=n, dim=dim, hidden_dim=dim)


# ----------------------------------------------------------------------------- sparse-pattern pairs
# (sliding_window, longformer, bigbird): fast-transformers' local attention, Hugging Face's Longformer and
# BigBird self-attention layers. What each pair's equal settings are is written in its builder; the tests
# check them against the peer's own pattern (tests/test_peers_blocked.py).


class FastTransformersLocal(nn.Module):
    """fast-transformers ``LocalAttention`` on our ``(batch, heads, n, d)`` layout.

    ``local_context = window + 1``: the peer lets query ``i`` see key ``j`` when ``|i - j| < local_context / 2``,
    i.e. ``|i - j| <= window // 2`` for an even window, our band. Causal: the peer's ``TriangularCausalMask``
    on top (``j <= i``), our causal band. The peer reads its neighbourhood from an ``n x n`` additive mask;
    it is built here, once, as a model reuses one mask across its layers and steps, so the measured step
    holds only what the attention itself allocates.
    """

    def __init__(self, window: int, n: int, causal: bool) -> None:
        super().__init__()
        from fast_transformers.attention.local_attention import LocalAttention
        from fast_transformers.masking import FullMask, TriangularCausalMask

        self.attention = LocalAttention(window + 1, attention_dropout=0.0)
        self.attn_mask = TriangularCausalMask(n) if causal else FullMask(n)
        self.attn_mask.additive_matrix_finite  # noqa: B018 - built and cached by the mask now, not in the step

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from fast_transformers.masking import LengthMask

        b, _, n, _ = q.shape
        lengths = LengthMask(torch.full((b,), n, dtype=torch.long, device=q.device), max_len=n)
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.attn_mask, lengths,
                             lengths)
        return out.transpose(1, 2)


def _fast_transformers_local_peer(cfg, settings, n):
    return FastTransformersLocal(cfg.window, n, settings.causal)


class HFLongformerLayer(nn.Module):
    """Hugging Face ``LongformerSelfAttention`` on ``x`` ``(batch, n, heads * head_dim)``: its own Q/K/V (and
    separate global Q/K/V) projections, ``attention_window = window`` (one-sided ``window // 2``, our band) and
    global attention at our ``global_positions``; then an output projection with bias, as
    :class:`ProjectedAttention` puts around ours (Hugging Face leaves it to ``LongformerSelfOutput``, with its
    dropout, residual and LayerNorm). The layer's mask (0 local, +10000 global) is built once here, as
    ``LongformerModel`` builds it once for all its layers."""

    def __init__(self, window: int, global_positions, heads: int, head_dim: int, n: int) -> None:
        super().__init__()
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(hidden_size=heads * head_dim, num_attention_heads=heads, attention_window=[window],
                                  attention_probs_dropout_prob=0.0, num_hidden_layers=1)
        self.attention = LongformerSelfAttention(config, layer_id=0)
        self.to_out = nn.Linear(heads * head_dim, heads * head_dim)
        mask = torch.zeros(1, n)
        mask[0, [p for p in global_positions if p < n]] = 10000.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.expand(x.shape[0], -1)
        is_global = mask > 0
        out = self.attention(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=is_global,
                             is_global_attn=bool(is_global.any()))[0]
        return self.to_out(out)


def _hf_longformer_peer(cfg, settings, n):
    return HFLongformerLayer(cfg.window, cfg.global_positions, settings.heads, settings.head_dim, n)


class HFBigBirdLayer(nn.Module):
    """Hugging Face ``BigBirdBlockSparseAttention`` on ``x`` ``(batch, n, heads * head_dim)``: its own bias-free
    Q/K/V projections (as ours), then an output projection with bias as around ours (Hugging Face leaves it
    to ``BigBirdSelfOutput``); ``block_size`` and ``num_random_blocks`` ours, and two
    global blocks (the peer's fixed first and last block; ours: ``num_global_blocks = 2`` leading blocks), so
    every non-global row reads 3 band + 2 global + r random blocks in both. The peer draws its random blocks
    only in training mode (in eval it reads block 0 in their place): it is kept in training mode, which
    changes nothing else (the block-sparse path has no dropout). Its block masks are built once here, as
    ``BigBirdModel`` builds them once for all its layers. transformers 5.x's block-sparse path also assembles
    the full ``(batch, heads, n, n)`` attention-probability matrix on every call (4.x did only when asked
    for ``output_attentions``, but transformers 4.57 needs huggingface-hub < 1.0 and datasets 5.2 >= 1.31):
    that matrix is in the peer's measured time and memory."""

    def __init__(self, block_size: int, num_random: int, heads: int, head_dim: int, n: int, seed: int) -> None:
        super().__init__()
        from transformers import BigBirdConfig, BigBirdModel
        from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

        config = BigBirdConfig(hidden_size=heads * head_dim, num_attention_heads=heads, block_size=block_size,
                               num_random_blocks=num_random, attention_type="block_sparse", use_bias=False,
                               max_position_embeddings=n, attention_probs_dropout_prob=0.0)
        self.attention = BigBirdBlockSparseAttention(config, seed=seed)
        self.to_out = nn.Linear(heads * head_dim, heads * head_dim)
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, n),
                                                                                            block_size)
        for name, t in (("blocked", blocked), ("band", band), ("from_mask", from_mask), ("to_mask", to_mask)):
            self.register_buffer(name, t, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.attention.train(True)  # the random blocks exist only in training mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        blocked = self.blocked.expand(b, -1, -1)
        out = self.attention(x, band_mask=self.band.expand(b, -1, -1, -1, -1),
                             from_mask=self.from_mask.expand(b, -1, -1, -1), to_mask=self.to_mask.expand(b, -1, -1, -1),
                             from_blocked_mask=blocked, to_blocked_mask=blocked)[0]
        return self.to_out(out)


def _hf_bigbird_peer(cfg, settings, n):
    return HFBigBirdLayer(cfg.block_size, cfg.num_random_blocks, settings.heads, settings.head_dim, n, cfg.seed)


# fast-transformers: its PyPI name, and the masks it is handed (README "Peers": built from source).
_FT = "pytorch-fast-transformers"
_FT_MASKS = ("fast-transformers mask objects (an n x n FullMask, or TriangularCausalMask when causal, and a "
             "LengthMask) built once with the pair, outside the measured step")

PAIRS: tuple[PeerPair, ...] = (
    PeerPair("performer", "performer", "performer_pytorch", "performer-pytorch FastAttention", "core",
             _performer_peer, patterns=("bidirectional", "causal")),
    PeerPair("rfa", "rfa", "fast_transformers", "fast-transformers LinearAttention + RandomFourierFeatures", "core",
             _rfa_fourier_peer, patterns=("bidirectional", "causal"), distribution=_FT,
             peer_masks=_FT_MASKS),
    # local-attention pads n up to a multiple of its block (window // 2) with zero keys that its bidirectional
    # band then attends to: equal settings need no such padding.
    PeerPair("sliding_window", "sliding_window", "local_attention", "local-attention LocalAttention", "core",
             _local_attention_peer, divisor=lambda cfg: cfg.window // 2, patterns=("bidirectional", "causal")),
    PeerPair("sliding_window_ft", "sliding_window", "fast_transformers", "fast-transformers LocalAttention", "core",
             _fast_transformers_local_peer, patterns=("bidirectional", "causal"), distribution=_FT,
             peer_masks=_FT_MASKS),
    PeerPair("longformer", "longformer", "transformers", "transformers LongformerSelfAttention", "layer",
             _hf_longformer_peer, divisor=lambda cfg: cfg.window),
    PeerPair("bigbird", "bigbird", "transformers", "transformers BigBirdBlockSparseAttention", "layer",
             _hf_bigbird_peer, ours_params={"num_global_blocks": 2}, divisor=lambda cfg: cfg.block_size),
    PeerPair("reformer", "reformer", "reformer_pytorch", "reformer-pytorch LSHAttention", "core", _reformer_peer,
             divisor=lambda cfg: 2 * cfg.bucket_size, patterns=("bidirectional", "causal")),
    PeerPair("reformer_ft", "reformer", "fast_transformers", "fast-transformers ReformerAttention", "core",
             _ft_reformer_peer, divisor=lambda cfg: cfg.bucket_size, patterns=("bidirectional", "causal"),
             distribution=_FT, peer_masks=_FT_MASKS),
    PeerPair("clustered_ft", "clustered", "fast_transformers", "fast-transformers ClusteredAttention", "core",
             _ft_clustered_peer, distribution=_FT, peer_masks=_FT_MASKS),
    PeerPair("clustered_improved_ft", "clustered", "fast_transformers", "fast-transformers ImprovedClusteredAttention",
             "core", _ft_improved_clustered_peer, ours_params={"improved": True}, distribution=_FT,
             peer_masks=_FT_MASKS),
    PeerPair("linformer", "linformer", "linformer", "linformer LinformerSelfAttention", "layer", _linformer_peer),
    PeerPair("memory_compressed", "memory_compressed", "memory_compressed_attention",
             "memory-compressed-attention MemoryCompressedAttention", "layer", _memory_compressed_peer),
    PeerPair("aft_full", "aft", "aft_pytorch", "aft-pytorch AFTFull", "layer", _aft_full_peer,
             ours_params={"mode": "full"}),
    PeerPair("aft_simple", "aft", "aft_pytorch", "aft-pytorch AFTSimple", "layer", _aft_simple_peer,
             ours_params={"mode": "simple"}),
)


def installed(package: str) -> bool:
    """Whether ``package`` (dotted names included) can be imported, without importing it.

    ``find_spec("a.b")`` imports ``a`` and raises ``ModuleNotFoundError`` when ``a`` is missing: that is
    "not installed" too, never an error.
    """
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        return False


def _call_core(peer: nn.Module, key: str, q, k, v):
    if key == "reformer":
        b, h, n, d = q.shape
        out = peer(q.reshape(b * h, n, d), v.reshape(b * h, n, d))[0]
        return out.view(b, h, n, d)
    return peer(q, k, v)


def measure_pair(pair: PeerPair, n: int, pass_: str, settings: BenchSettings) -> dict[str, Any]:
    """Ours and the peer on the same inputs: time and memory of each, and ours/peer ratios."""
    params = {**mechanism_params(pair.mechanism, n, settings), **(pair.ours_params or {})}
    if pair.ours_params and "max_seq_len" not in params and pair.ours_params.get("mode") == "full":
        params["max_seq_len"] = n
    dtype = DTYPES[settings.dtype]
    device = settings.device
    torch.manual_seed(0)  # peers draw their random state from the global RNG
    ours = build_attention(pair.mechanism, **params).to(device=device, dtype=dtype).eval()
    if pair.divisor is not None and n % pair.divisor(ours.config):
        raise ValueError(f"{pair.peer} needs n divisible by {pair.divisor(ours.config)}, got n={n}")
    peer = pair.build_peer(ours.config, settings, n).to(device=device, dtype=dtype).eval()
    backward = pass_ == "fwd+bwd"
    heads, head_dim = settings.heads, settings.head_dim
    if pair.level == "core":
        q, k, v = make_inputs((settings.batch, heads, n, head_dim), settings, seed=n, requires_grad=backward)
        qk = q if pair.mechanism == "reformer" else k  # shared-QK peers hash the queries as keys

        def ours_fwd():
            return ours(q, qk, v)

        def peer_fwd():
            return _call_core(peer, pair.key, q, qk, v)

        inputs, ours_params = [q, k, v], list(ours.parameters())
    else:
        x = make_inputs((settings.batch, n, heads * head_dim), settings, seed=n, requires_grad=backward)[0]
        wrapped = ProjectedAttention(ours, heads, head_dim).to(device=device, dtype=dtype).eval()

        def ours_fwd():
            return wrapped(x)

        def peer_fwd():
            return peer(x)

        inputs, ours_params = [x], list(wrapped.parameters())  # includes ours' own parameters
    inputs = [t for t in inputs if t.requires_grad]
    ours_leaves = inputs + [p for p in ours_params if p.requires_grad]
    peer_leaves = inputs + [p for p in peer.parameters() if p.requires_grad]
    a, b = measure_ab((ours_fwd, ours_leaves), (peer_fwd, peer_leaves), pass_, settings)
    ours_layout = PROJECTED if pair.level == "core" else LAYER
    masks = mask_text(settings.causal)
    common = {"warmup": settings.warmup, "repeats": settings.repeats, "cpu_allocator": settings.cpu_allocator_used,
              "pass_": pass_}
    return {
        "ours": a, "peer_result": b, "params": jsonable_params(params),
        "time_ratio": a["time"]["median_s"] / b["time"]["median_s"],
        "memory_ratio": a["memory"]["peak_bytes"] / max(b["memory"]["peak_bytes"], 1),
        "protocol": protocol(layout=ours_layout, masks=masks, backend=getattr(ours, "backend", "torch"), **common),
        "peer_protocol": protocol(layout=pair.peer_layout or ours_layout, masks=pair.peer_masks or masks,
                                  backend=f"{pair.peer} ({pair.pip_name} {package_version(pair.pip_name)})",
                                  **common),
        "peer_settings": module_settings(peer), "peer_version": package_version(pair.pip_name),
    }


def measure_ab(ours: tuple, peer: tuple, pass_: str, settings: BenchSettings) -> tuple[dict, dict]:
    """Time and memory of ours and the peer, each ``(forward, leaves)``: timed in interleaved rounds (ours, peer,
    ours, peer, ...: :func:`harness.measure.time_rounds`, so load hits both alike), then each one's memory step.
    Returns ``({"time", "memory"}, {"time", "memory"})``; raises what either step raises."""
    steps = [make_step(forward, leaves, pass_) for forward, leaves in (ours, peer)]
    timings = time_rounds([step for step, _ in steps], settings.device, settings.warmup, settings.repeats)
    for timing in timings:
        if isinstance(timing, Exception):
            raise timing
    results = []
    for (step, clear_grads), timing in zip(steps, timings):
        reading = step_peak(step, clear_grads, settings.device)
        results.append({"time": {k: timing[k] for k in ("median_s", "p10_s", "p90_s", "times_s")},
                        "memory": {"peak_bytes": reading.peak_bytes, "method": reading.method}})
    return results[0], results[1]


def _pair_outcome(pair: PeerPair, n: int, pass_: str, settings: BenchSettings) -> tuple[dict, str, str | None]:
    """(result, status, reason) of one pair cell: measured, failed, or ``unsupported`` with the reason "not
    installed" (a cell that says so, never a silent skip)."""
    if not installed(pair.package):
        return {}, "unsupported", f"not installed: pip install {pair.pip_name} (README 'Peers')"
    try:
        return measure_pair(pair, n, pass_, settings), "ok", None
    except Exception as exc:  # noqa: BLE001 - a peer's failure is recorded, not raised
        failure = failure_outcome(exc)
        return {}, failure["outcome"], failure["reason"]


def peer_key(pair: PeerPair, n: int, pass_: str, settings: BenchSettings) -> str:
    """Hash of every setting that changes a pair's numbers (the causal pattern only when set, as for cells)."""
    key = {"pair": pair.key, "n": n, "pass": pass_, "batch": settings.batch, "heads": settings.heads,
           "head_dim": settings.head_dim, "dtype": settings.dtype, "device": settings.device,
           "repeats": settings.repeats, "params": jsonable_params(mechanism_params(pair.mechanism, n, settings))}
    if settings.causal:
        key["pattern"] = settings.pattern
    return config_hash(key)


def run_peers(settings: BenchSettings, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Measure every pair whose peer package is installed; one line when none is (or some are missing)."""
    registered = set(available_attentions())
    wanted = select_mechanisms(settings.mechanisms, settings.causal)
    pairs = [p for p in PAIRS if p.mechanism in registered and p.mechanism in wanted and settings.pattern in p.patterns]
    if not pairs:
        log(f"peers: none of the selected mechanisms has a public {settings.pattern} peer")
        return pd.DataFrame()
    missing = sorted({p.pip_name for p in pairs if not installed(p.package)})
    if missing:
        log(f"peers: not installed: {', '.join(missing)} (README 'Peers'); their cells say so")
    root = settings.results_dir
    seq_lens = [int(n) for n in settings.peers.seq_lens]
    todo = [(p, n, pass_) for p in pairs for n in seq_lens for pass_ in settings.passes]
    bar = progress_bar(len(todo), "peers", settings.progress)
    rows = []
    for pair, n, pass_ in todo:
        bar.set_postfix_str(f"{pair.key} n={n} {pass_}")
        key = peer_key(pair, n, pass_, settings)
        record_id = f"{pair.key.replace('_', '-')}.{'fwd' if pass_ == 'fwd' else 'fwdbwd'}.n{n}.{key}"
        record = find_record(root, "peer", record_id) if settings.reuse else None
        if record is None or record["status"] == "error" or record.get("peer_installed") is False:
            result, status, reason = _pair_outcome(pair, n, pass_, settings)
            record = {
                "kind": "peer", "record_id": record_id, "status": status, "created_at": now_iso(),
                "pair": pair.key, "mechanism": pair.mechanism, "peer": pair.peer, "level": pair.level,
                "pattern": settings.pattern,
                "comparison": ("same projected q, k, v" if pair.level == "core"
                               else "ours wrapped in the peer's Q/K/V/output projections"),
                "n": n, "pass": pass_, "batch": settings.batch, "heads": settings.heads,
                "head_dim": settings.head_dim, "dtype": settings.dtype, "device": settings.device,
                "reason": reason, "peer_installed": installed(pair.package), **result,
            }
            write_record(record, root)
        rows.append({k: record.get(k) for k in ("pair", "peer", "level", "pattern", "n", "pass", "status",
                                                 "time_ratio", "memory_ratio", "reason")})
        bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    log("peers (ours / peer; < 1 = ours faster or smaller):")
    log(df.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    return df
