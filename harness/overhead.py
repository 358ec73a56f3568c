"""Harness overhead: one training step of our backbone vs an equally sized torch.nn.TransformerEncoder.

    python -m harness.overhead                      # CPU, default sizes
    python -m harness.overhead --batch 16 --length 512 --embed 128 --layers 2 --threads 2

Both models have the same embedding, sinusoidal positions, CLS token, widths (embed, heads,
feed-forward), pre-LN blocks (``norm_first=True``), GELU, final LayerNorm and LRA classifier
head; both mask padding (``key_padding_mask`` / ``src_key_padding_mask``), apply the same
dropout (attention probabilities included) and run softmax attention through PyTorch SDPA.
A step is forward + cross-entropy + backward + AdamW, so the ratio measures what our
multi-head wrapper and mechanism dispatch cost over PyTorch's fused ``nn.MultiheadAttention``.
"With data loading" adds fetching the batch from the real ListOps task (``task.batches``) to
our step only. Steps of the two models are interleaved (A, B, A, B, ...) so drifting machine
load hits both; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from harness.model import ModelConfig, build_model, sinusoidal_table


class TorchEncoderBaseline(nn.Module):
    """The same classifier built on torch.nn.TransformerEncoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_emb", sinusoidal_table(cfg.max_length + 1, cfg.embed_dim), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(cfg.embed_dim),
                                             enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(cfg.embed_dim, cfg.mlp_dim), nn.ReLU(),
                                  nn.Linear(cfg.mlp_dim, cfg.num_classes))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        x = torch.cat([self.cls.expand(batch, -1, -1), self.token_emb(tokens)], dim=1)
        mask = torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        x = self.dropout(x + self.pos_emb[: x.shape[1]])
        x = self.encoder(x, src_key_padding_mask=~mask)  # torch: True = padding
        return self.head(x[:, 0])


def _step_fn(model: nn.Module, get_batch: Callable[[], dict]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        batch = get_batch()
        loss = nn.functional.cross_entropy(model(batch["tokens"], batch["mask"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _cycle(make: Callable[[], Iterator[dict]]) -> Callable[[], dict]:
    state = {"it": make()}

    def get() -> dict:
        batch = next(state["it"], None)
        if batch is None:
            state["it"] = make()
            batch = next(state["it"])
        return batch

    return get


def interleaved_medians(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare(batch: int, length: int, embed: int, heads: int, mlp: int, layers: int, dropout: float = 0.1,
            warmup: int = 3, repeats: int = 15, seed: int = 0) -> dict[str, float]:
    """Median step times (s) of the baseline, our backbone, and our backbone with data loading."""
    from tasks import build_task

    cache = tempfile.mkdtemp(prefix="arena-overhead-")
    task = build_task("listops", cache_dir=cache, seed=seed, num_train=4 * batch, num_val=batch, num_test=batch,
                      min_length=10, max_length=length, max_depth=6, max_args=8)
    task.prepare()
    cfg = ModelConfig(vocab_size=task.vocab_size, max_length=length, num_classes=task.num_classes, embed_dim=embed,
                      num_heads=heads, qkv_dim=embed, mlp_dim=mlp, num_layers=layers, dropout=dropout,
                      attention_dropout=dropout, pooling="cls", pos_emb="sinusoidal", attention="full")
    fixed = next(iter(task.batches("train", batch)))
    torch.manual_seed(seed)
    ours = build_model(cfg)
    torch.manual_seed(seed)
    baseline = TorchEncoderBaseline(cfg)
    fns = {
        "torch_encoder": _step_fn(baseline, lambda: fixed),
        "ours": _step_fn(ours, lambda: fixed),
        "ours_with_data": _step_fn(ours, _cycle(lambda: iter(task.batches("train", batch, shuffle=True,
                                                                          drop_last=True)))),
    }
    result = interleaved_medians(fns, warmup, repeats)
    result["params_ours"] = ours.num_parameters()
    result["params_torch"] = sum(p.numel() for p in baseline.parameters())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout everywhere, attention included (both)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = compare(args.batch, args.length, args.embed, args.heads, args.mlp, args.layers, args.dropout,
                repeats=args.repeats)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {args.batch}, length "
          f"{args.length}, embed {args.embed}, heads {args.heads}, mlp {args.mlp}, layers {args.layers}, "
          f"dropout {args.dropout}; "
          f"median of {args.repeats} interleaved steps")
    print(f"parameters: ours {r['params_ours']:,}  torch {r['params_torch']:,}")
    print(f"torch.nn.TransformerEncoder step : {r['torch_encoder'] * 1e3:8.2f} ms")
    print(f"our backbone step                : {r['ours'] * 1e3:8.2f} ms   ratio {r['ours'] / r['torch_encoder']:.3f}x"
          "  (target <= 1.10x)")
    print(f"our backbone step + data loading : {r['ours_with_data'] * 1e3:8.2f} ms   ratio "
          f"{r['ours_with_data'] / r['torch_encoder']:.3f}x  (target <= 1.15x)")


if __name__ == "__main__":
    main()
