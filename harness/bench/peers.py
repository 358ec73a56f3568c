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

Without the extra installed, :func:`run_peers` prints one line saying the peers were skipped.

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
from harness.bench.cells import make_inputs, measure_forward, mechanism_params, select_mechanisms
from harness.bench.settings import BenchSettings
from harness.measure import DTYPES, failure_outcome, jsonable_params, progress_bar
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


def _performer_peer(cfg, settings, n):
    from performer_pytorch import FastAttention

    return FastAttention(dim_heads=settings.head_dim, nb_features=cfg.num_features, causal=settings.causal)


def _local_attention_peer(cfg, settings, n):
    from local_attention import LocalAttention

    # Query i sees keys i - window // 2 .. i: blocks of window // 2, one look-back block, exact window,
    # no rotary embedding (ours has none).
    return LocalAttention(window_size=cfg.window // 2, causal=True, look_backward=1, exact_windowsize=True,
                          autopad=True, use_rotary_pos_emb=False)


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


PAIRS: tuple[PeerPair, ...] = (
    PeerPair("performer", "performer", "performer_pytorch", "performer-pytorch FastAttention", "core",
             _performer_peer, patterns=("bidirectional", "causal")),
    PeerPair("sliding_window", "sliding_window", "local_attention", "local-attention LocalAttention", "core",
             _local_attention_peer, patterns=("causal",)),
    PeerPair("reformer", "reformer", "reformer_pytorch", "reformer-pytorch LSHAttention", "core", _reformer_peer,
             divisor=lambda cfg: 2 * cfg.bucket_size, patterns=("bidirectional", "causal")),
    PeerPair("reformer_ft", "reformer", "fast_transformers", "fast-transformers ReformerAttention", "core",
             _ft_reformer_peer, divisor=lambda cfg: cfg.bucket_size, patterns=("bidirectional", "causal")),
    PeerPair("clustered_ft", "clustered", "fast_transformers", "fast-transformers ClusteredAttention", "core",
             _ft_clustered_peer),
    PeerPair("clustered_improved_ft", "clustered", "fast_transformers", "fast-transformers ImprovedClusteredAttention",
             "core", _ft_improved_clustered_peer, ours_params={"improved": True}),
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
    a = measure_forward(ours_fwd, ours_leaves, pass_, settings)
    b = measure_forward(peer_fwd, peer_leaves, pass_, settings)
    return {
        "ours": a, "peer_result": b, "params": jsonable_params(params),
        "time_ratio": a["time"]["median_s"] / b["time"]["median_s"],
        "memory_ratio": a["memory"]["peak_bytes"] / max(b["memory"]["peak_bytes"], 1),
    }


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
    missing = sorted({p.package for p in pairs if not installed(p.package)})
    pairs = [p for p in pairs if installed(p.package)]
    if not pairs:
        log("peers: skipped (the optional 'peers' extra is not installed: pip install -e '.[peers]')")
        return pd.DataFrame()
    if missing:
        log(f"peers: skipped {', '.join(missing)} (not installed)")
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
        if record is None or record["status"] == "error":
            try:
                result, status, reason = measure_pair(pair, n, pass_, settings), "ok", None
            except Exception as exc:  # noqa: BLE001 - a peer's failure is recorded, not raised
                failure = failure_outcome(exc)
                result, status, reason = {}, failure["outcome"], failure["reason"]
            record = {
                "kind": "peer", "record_id": record_id, "status": status, "created_at": now_iso(),
                "pair": pair.key, "mechanism": pair.mechanism, "peer": pair.peer, "level": pair.level,
                "pattern": settings.pattern,
                "comparison": ("same projected q, k, v" if pair.level == "core"
                               else "ours wrapped in the peer's Q/K/V/output projections"),
                "n": n, "pass": pass_, "batch": settings.batch, "heads": settings.heads,
                "head_dim": settings.head_dim, "dtype": settings.dtype, "device": settings.device,
                "reason": reason, **result,
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
