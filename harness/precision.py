"""Reduced-precision error table: every mechanism's bf16/fp16 error against its own float64 evaluation.

For each mechanism (registry defaults, plus named variants), input scale ``s`` and dtype:
q, k, v ~ N(0, 1) in float32, q and k multiplied by ``s``, rounded to the dtype. The error is
``max |out(dtype) - out64|``, ``out64`` the same module (same parameters, buffers and random
features, :func:`float64_twin`) evaluated in float64 on the same rounded inputs; so it measures
the mechanism's arithmetic only, not its approximation. The "rounding floor" is what merely
rounding the float64 output to the dtype costs: no mechanism returning that dtype can do better,
and it is larger for mechanisms whose outputs are larger. PyTorch's
``scaled_dot_product_attention`` on the same inputs, against its own float64 evaluation, is the
yardstick (issue 11 asks for at most 2x its error).

    python -m harness.precision                      # markdown table, CPU, bf16 and fp16, s = 1, 10
    python -m harness.precision --dtypes bfloat16 --scales 1 10 100 --device cuda

Imports only ``attentions`` from the project (tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attentions import available_attentions, build_attention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Variants measured besides each mechanism's defaults: paths the defaults do not take.
VARIANTS: dict[str, tuple[str, dict]] = {
    "full[reference]": ("full", {"backend": "reference"}),
    "clustered[improved]": ("clustered", {"improved": True}),
    "aft[full]": ("aft", {"mode": "full"}),
    "performer[relu]": ("performer", {"kernel": "relu"}),
}


@dataclass(frozen=True)
class Shape:
    batch: int = 2
    heads: int = 2
    seq: int = 512
    head_dim: int = 32


def float64_twin(module: torch.nn.Module) -> torch.nn.Module:
    """The same module (parameters, buffers, random features) in float64."""
    return copy.deepcopy(module).double()


def inputs(shape: Shape, scale: float, seed: int, dtype: torch.dtype, device: str = "cpu"):
    """``(q, k, v)`` in ``dtype``: N(0, 1) draws, q and k times ``scale``, rounded once to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    dims = (shape.batch, shape.heads, shape.seq, shape.head_dim)
    q, k, v = (torch.randn(dims, generator=g) for _ in range(3))
    return tuple(t.to(dtype).to(device) for t in (q * scale, k * scale, v))


def mechanism_error(module: torch.nn.Module, qkv, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Max abs error of ``module`` on ``qkv`` against its float64 twin on the same values, and the
    rounding floor: the error of the float64 output merely rounded to the input dtype."""
    twin = float64_twin(module)
    with torch.no_grad():
        out = module(*qkv, key_padding_mask=mask).double()
        ref = twin(*(t.double() for t in qkv), key_padding_mask=mask)
    floor = (ref.to(qkv[0].dtype).double() - ref).abs().max()
    return float((out - ref).abs().max()), float(floor)


def sdpa_error(qkv) -> float:
    """Max abs error of PyTorch SDPA on ``qkv`` against SDPA in float64 on the same values."""
    with torch.no_grad():
        out = F.scaled_dot_product_attention(*qkv).double()
        ref = F.scaled_dot_product_attention(*(t.double() for t in qkv))
    return float((out - ref).abs().max())


def build(label: str, shape: Shape) -> torch.nn.Module:
    name, params = VARIANTS.get(label, (label, {}))
    return build_attention(name, num_heads=shape.heads, head_dim=shape.head_dim, max_seq_len=shape.seq,
                           **params).eval()


def error_table(labels: Iterable[str], dtypes: Iterable[str], scales: Iterable[float], shape: Shape,
                seeds: int = 2, device: str = "cpu") -> list[dict]:
    """One row per (mechanism, dtype, scale): worst error over ``seeds`` draws, ours and SDPA's."""
    rows = []
    for label in labels:
        module = build(label, shape).to(device)
        for dtype_name in dtypes:
            for s in scales:
                ours = theirs = floor = 0.0
                for seed in range(seeds):
                    qkv = inputs(shape, s, seed, DTYPES[dtype_name], device)
                    err, rounding = mechanism_error(module, qkv)
                    ours, floor = max(ours, err), max(floor, rounding)
                    theirs = max(theirs, sdpa_error(qkv))
                rows.append({"mechanism": label, "dtype": dtype_name, "s": s, "ours": ours, "sdpa": theirs,
                             "floor": floor, "ratio": ours / theirs if theirs > 0 else float("inf")})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| mechanism | dtype | s | ours max abs err | SDPA max abs err | ours / SDPA | output rounding floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mechanism']} | {r['dtype']} | {r['s']:g} | {r['ours']:.2e} | {r['sdpa']:.2e} "
                     f"| {r['ratio']:.2f} | {r['floor']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mechanisms", nargs="*", default=None, help="default: every registered one plus variants")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"], choices=sorted(DTYPES))
    parser.add_argument("--scales", nargs="*", type=float, default=[1.0, 10.0])
    parser.add_argument("--seq", type=int, default=Shape.seq)
    parser.add_argument("--head-dim", type=int, default=Shape.head_dim)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    labels = args.mechanisms or [*available_attentions(), *VARIANTS]
    shape = Shape(seq=args.seq, head_dim=args.head_dim)
    print(to_markdown(error_table(labels, args.dtypes, args.scales, shape, args.seeds, args.device)))


if __name__ == "__main__":
    main()
