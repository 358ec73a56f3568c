"""The approximation-error study: each mechanism's relative error against exact attention vs its budget.

Records of kind ``approx`` (one per mechanism, budget value, input variant), computed on CPU in fp32
against a float64 reference (:func:`exact_reference`).

Owns: the budget tables, the input variants, the exact reference and the study's records.
Imports: ``attentions``, :mod:`harness.measure`, :mod:`harness.store`, :mod:`harness.bench.cells`,
:mod:`harness.bench.settings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attentions import available_attentions, build_attention, get_attention_info
from attentions.rfa import kernel_reference
from harness.bench.cells import family, mechanism_params
from harness.bench.settings import APPROX_VARIANTS, BenchSettings
from harness.measure import failure_outcome, jsonable_params, progress_bar
from harness.store import config_hash, find_record, now_iso, write_record

# Budget parameter swept for the approximation error, per mechanism (at the default n = 1024).
APPROX_BUDGETS: dict[str, tuple[str, list]] = {
    "performer": ("num_features", [16, 32, 64, 128, 256, 512]),
    "rfa": ("num_features", [16, 32, 64, 128, 256, 512]),
    "linformer": ("proj_dim", [16, 32, 64, 128, 256, 512]),
    "clustered": ("num_clusters", [8, 16, 32, 64, 128, 256]),
    "reformer": ("n_hashes", [1, 2, 4, 8]),
    "memory_compressed": ("compression", [2, 3, 4, 8, 16]),
    "sliding_window": ("window", [16, 32, 64, 128, 256, 512]),
    "longformer": ("window", [16, 32, 64, 128, 256, 512]),
    "bigbird": ("block_size", [8, 16, 32, 64, 128]),
}
# AFT is left out: it replaces attention by learned position biases and approximates no attention function.
APPROX_SMOKE_BUDGETS: dict[str, tuple[str, list]] = {
    "performer": ("num_features", [8, 32]),
    "rfa": ("num_features", [8, 32]),
    "linformer": ("proj_dim", [8, 32]),
    "clustered": ("num_clusters", [4, 16]),
    "reformer": ("n_hashes", [1, 2]),
    "memory_compressed": ("compression", [2, 4]),
    "sliding_window": ("window", [8, 128]),
    "longformer": ("window", [8, 128]),
    "bigbird": ("block_size", [4, 8]),
}
APPROX_INPUT_DOC = {
    "iid": "q, k, v ~ N(0, 1) per entry (logits ~ N(0, 1): flat attention)",
    "smooth": "trained-like: AR(1) channels (rho 0.95), k = q + 0.3 noise; self logit ~ sqrt(d), distant ~ N(0, 1)",
}


def approx_inputs(variant: str, batch: int, heads: int, n: int, head_dim: int, seed: int):
    """Inputs for the approximation error.

    ``iid``: q, k, v ~ N(0, 1) per entry: logits q.k/sqrt(d) ~ N(0, 1), a flat attention map.
    ``smooth``: "trained-like": each channel an AR(1) sequence (rho = 0.95, unit variance) so
    neighbouring tokens are similar, and k = q + 0.3 * noise: a query's logit with itself is
    ~ sqrt(d) (5.7 at d = 32), with distant tokens ~ N(0, 1). Trained attention maps are local
    and peaked; this puts most of the mass near the diagonal, the regime sparse, hashing and
    clustering mechanisms are designed for.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(batch, heads, n, head_dim, generator=gen)

    if variant == "iid":
        return randn(), randn(), randn()
    if variant != "smooth":
        raise ValueError(f"approximation input variant must be one of {APPROX_VARIANTS}, got {variant!r}")
    rho = 0.95
    noise = randn()
    x = torch.empty_like(noise)
    x[:, :, 0] = noise[:, :, 0]
    scale = math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, :, t] = rho * x[:, :, t - 1] + scale * noise[:, :, t]
    return x, x + 0.3 * randn(), randn()


def reference_name(name: str, params: dict | None = None) -> str:
    """What ``name`` is compared to (see :func:`exact_reference`), as the report names it."""
    if name == "rfa":
        return f"its Gaussian kernel, softmax(q^.k^ / sigma^2), sigma={float((params or {}).get('sigma', 1.0)):g}"
    return "shared-QK softmax" if get_attention_info(name).shared_qk else "softmax"


def exact_reference(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    params: dict | None = None) -> torch.Tensor:
    """Exact attention that ``name`` approximates, in float64 (returned as float32).

    Softmax attention ``softmax(q k^T / sqrt(d)) v`` for every mechanism except: shared-QK ones
    (reformer), whose exact counterpart is shared-QK softmax attention with unit-normalised keys
    and no attention to self (score -1e5, Kitaev et al. 2020), so their error measures the LSH
    restriction alone, not the change of attention function; and RFA, whose random features estimate
    the Gaussian kernel on normalised q, k (:func:`attentions.rfa.kernel_reference`, its ``sigma``
    from ``params``), not softmax with temperature sqrt(d).
    """
    if name == "rfa":
        return kernel_reference(q, k, v, float((params or {}).get("sigma", 1.0))).float()
    q, k, v = q.double(), k.double(), v.double()
    if not get_attention_info(name).shared_qk:
        return F.scaled_dot_product_attention(q, k, v).float()
    keys = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    eye = torch.eye(q.shape[-2], dtype=torch.bool)
    scores = scores.masked_fill(eye, -1e5)
    return (torch.softmax(scores, dim=-1) @ v).float()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||approx - exact||_F / ||exact||_F."""
    return float(torch.linalg.vector_norm(approx - exact) / torch.linalg.vector_norm(exact))


def approximation_errors(settings: BenchSettings, mechanisms: Sequence[str] | None = None,
                         log: Callable[[str], None] = print) -> pd.DataFrame:
    """Relative error against exact softmax attention per mechanism, budget value and input variant.

    Computed on CPU in fp32 on ``approx.n`` tokens, averaged over ``approx.seeds`` seeds
    (the seed draws the inputs and the mechanism's random state), against :func:`exact_reference`.
    On iid inputs the exact output averages many values and has a small norm, so a mechanism
    that averages few (a narrow window) can exceed relative error 1. Linformer's E/F, the
    memory-compressed convolution and AFT's position biases are untrained (random init):
    their error is that of an untrained layer, an upper bound of what training reaches.
    """
    acfg = settings.approx
    table = APPROX_SMOKE_BUDGETS if acfg.budgets == "smoke" else APPROX_BUDGETS
    names = [m for m in (mechanisms or available_attentions()) if m in table]
    todo = [(m, val, var) for m in names for val in table[m][1] for var in acfg.variants]
    bar = progress_bar(len(todo), "approx", settings.progress)
    rows = []
    for name, value, variant in todo:
        bar.set_postfix_str(f"{name} {table[name][0]}={value} {variant}")
        record = _approx_record(name, table[name][0], value, variant, settings)
        rows.append({k: record.get(k) for k in ("mechanism", "param", "value", "variant", "status", "error_mean",
                                                 "error_std", "reason")})
        bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def _approx_record(name: str, param: str, value: Any, variant: str, settings: BenchSettings) -> dict:
    """The stored record of one (mechanism, budget value, variant), measured unless reusable."""
    acfg = settings.approx
    n, batch = int(acfg.n), int(acfg.batch)
    base = mechanism_params(name, n, settings)
    base[param] = value
    shared_qk = get_attention_info(name).shared_qk
    reference = reference_name(name, base)
    # The key keeps its earlier "reference" values for softmax and shared-QK, so those records stay valid.
    key = config_hash({"m": name, "params": jsonable_params(base), "n": n, "variant": variant,
                       "seeds": acfg.seeds, "batch": batch,
                       "reference": {"softmax": "softmax", "shared-QK softmax": "shared_qk"}.get(reference, reference)})
    record_id = f"{name.replace('_', '-')}.{param}={value}.n{n}.{variant}.{key}"
    old = find_record(settings.results_dir, "approx", record_id) if settings.reuse else None
    if old is not None and old["status"] != "error":
        return old
    errors, status, reason = [], "ok", None
    try:
        for seed in range(int(acfg.seeds)):
            q, k, v = approx_inputs(variant, batch, settings.heads, n, settings.head_dim, seed)
            if shared_qk:
                k = q  # as the backbone ties them; the reference is the same shared-QK attention
            exact = exact_reference(name, q, k, v, base)
            attn = build_attention(name, **{**base, "seed": seed}).eval()
            with torch.no_grad():
                errors.append(relative_error(attn(q, k, v), exact))
    except Exception as exc:  # noqa: BLE001
        failure = failure_outcome(exc)
        status, reason = failure["outcome"], failure["reason"]
    ok = bool(errors) and status == "ok"
    record = {
        "kind": "approx", "record_id": record_id, "status": status, "created_at": now_iso(),
        "mechanism": name, "family": family(name), "param": param, "value": value, "n": n,
        "variant": variant, "heads": settings.heads, "head_dim": settings.head_dim, "batch": batch,
        "seeds": int(acfg.seeds), "params": jsonable_params(base), "reason": reason,
        "errors": errors, "error_mean": float(np.mean(errors)) if ok else None,
        "error_std": float(np.std(errors)) if ok else None,
        "smoke": bool(settings.smoke), "inputs": APPROX_INPUT_DOC[variant], "reference": reference,
    }
    write_record(record, settings.results_dir)
    return record
