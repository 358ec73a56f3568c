"""Interchangeable attention mechanisms behind one registry.

    from attentions import build_attention, available_attentions
    attn = build_attention("full", num_heads=4, head_dim=32)
    out = attn(q, k, v, key_padding_mask=mask)

Every module in this package registers itself on import; importing the package
imports them all, so ``available_attentions()`` is complete.
"""

import importlib
import pkgutil

from .base import LAYOUT, Attention
from .decoding import DecodeState, state_bytes
from .registry import (
    FAMILIES,
    AttentionConfig,
    AttentionInfo,
    available_attentions,
    build_attention,
    causal_attentions,
    get_attention_info,
    make_config,
    register_attention,
    require,
)

_INFRASTRUCTURE = {"base", "registry", "functional", "testing", "decoding", "rotary"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FAMILIES",
    "LAYOUT",
    "Attention",
    "AttentionConfig",
    "AttentionInfo",
    "DecodeState",
    "available_attentions",
    "build_attention",
    "causal_attentions",
    "get_attention_info",
    "make_config",
    "register_attention",
    "require",
    "state_bytes",
]
