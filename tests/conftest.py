"""Shared fixtures: small inputs and the small per-mechanism settings the tests use."""

from __future__ import annotations

import pytest
import torch

from attentions import build_attention

HEADS = 2
HEAD_DIM = 8
MAX_LEN = 64

# Small budgets so every mechanism runs its real (non-degenerate) path on short inputs:
# windows and blocks smaller than the sequence, fewer features/clusters than tokens.
SMALL_PARAMS: dict[str, dict] = {
    "full": {},
    "sliding_window": {"window": 8},
    "longformer": {"window": 8, "global_positions": (0, 5)},
    "bigbird": {"block_size": 4, "num_global_blocks": 1, "num_random_blocks": 2},
    "linformer": {"proj_dim": 8},
    "performer": {"num_features": 16},
    "rfa": {"num_features": 16},
    "reformer": {"bucket_size": 4, "n_hashes": 2},
    "aft": {"mode": "local", "window": 6},
    "clustered": {"num_clusters": 4},
    "memory_compressed": {"compression": 3},
}


def build_small(name: str, **overrides):
    params = {"num_heads": HEADS, "head_dim": HEAD_DIM, "max_seq_len": MAX_LEN, **SMALL_PARAMS.get(name, {})}
    params.update(overrides)
    return build_attention(name, **params)


def make_qkv(batch: int = 2, seq: int = 37, heads: int = HEADS, dim: int = HEAD_DIM, seed: int = 0,
             dtype=torch.float32, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype) for _ in range(3))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def right_padding_mask(lengths: list[int], seq: int) -> torch.Tensor:
    """(batch, seq) bool mask, True for the first ``lengths[b]`` positions."""
    return torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: tiny models run fastest on one thread, timings on a shared
    machine are steadier, and memory does not depend on it. Modules that want it everywhere:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
