"""The whole models the decode benchmark times (scope ``model``): their configurations and what decoding needs
of the backbone.

Three sizes, each a trained recipe (:data:`RECIPES`; conf/experiment/quick/mqar_causal.yaml: the decoder form of
MQAR, vocabulary 128, learned positions, the recipe's per-mechanism budgets ``attention_overrides``):

- ``mqar_causal``: the ``quick/mqar_causal`` backbone as trained (embed 64, 4 heads, qkv 64, 2 layers, mlp 128);
- ``large``: the same recipe at one larger size, embed 256, 8 heads of 32 (qkv 256), 4 layers, mlp 1024
  (:data:`LARGE`), for a model whose layers cost more than their bookkeeping;
- ``mqar_causal_mqa``: the ``quick/mqar_causal_mqa`` backbone as trained, the same with one key-value head
  (``num_kv_heads: 1``, multi-query attention; issue 26): beside ``mqar_causal``, what multi-query saves in state.

A cell changes only ``max_length`` and what derives from it (:func:`at_context`; the records' ``config_changes``
list them). Decode speed and state bytes depend on the architecture and configuration, not on the weights, so
the models are freshly initialised.

The backbone's decoding API (``ArenaModel.init_states/prefill/step``, ``harness.model.decode_state_bytes``) and
``harness.generate.with_context`` are issue 24's backbone part; until they exist a model cell is
``unsupported`` naming what is missing, and :func:`at_context` uses the stand-in :func:`_with_context`.

Owns: the model sizes and the adapter to the backbone's decoding API. Imports: ``attentions``,
:mod:`harness.model`, :mod:`harness.plugins` (the config folder), omegaconf.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from attentions import get_attention_info, make_config
from harness.plugins import conf_dir, recipe_file

RECIPE = "quick/mqar_causal"
# The larger size: heads of the recipe's head dim (32) so the mechanisms' budgets mean the same per head.
LARGE = {"embed_dim": 256, "num_heads": 8, "qkv_dim": 256, "mlp_dim": 1024, "num_layers": 4}
# Each size's recipe (conf/experiment/<recipe>.yaml, with what it inherits from another recipe).
RECIPES = {"mqar_causal": RECIPE, "large": RECIPE, "mqar_causal_mqa": "quick/mqar_causal_mqa"}
MODEL_SIZES = tuple(RECIPES)
MISSING_API = ("the backbone has no decoding API yet (ArenaModel.init_states, prefill, step and "
               "harness.model.decode_state_bytes: issue 24's backbone part)")


def recipe_model_config(mechanism: str, size: str) -> dict[str, Any]:
    """The ModelConfig fields (a dict) of the size's recipe (:data:`RECIPES`) trained with ``mechanism``, at
    ``size``: the backbone's defaults (conf/model/base.yaml), the recipe's ``model`` section (``num_kv_heads``
    included), the task's shapes (vocabulary, length, one class per token, token-level) and the recipe's budgets
    for the mechanism. Raises ValueError for an unknown size."""
    from omegaconf import OmegaConf

    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {', '.join(MODEL_SIZES)}, got {size!r}")
    base = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "base.yaml"), resolve=True)
    recipe = recipe_file(RECIPES[size])
    task = recipe["task"]["params"]
    overrides = recipe.get("attention_overrides") or {}
    config = {**base, **recipe["model"], "vocab_size": int(task["vocab_size"]), "max_length": int(task["seq_len"]),
              "num_classes": int(task["vocab_size"]), "token_level": True, "attention": mechanism,
              "attention_params": dict(overrides.get(mechanism) or {}), "seed": 0}
    if size == "large":
        config.update(LARGE)
    return config


def size_kv_heads(size: str) -> int | None:
    """The ``num_kv_heads`` the size's recipe sets (None: as many as its query heads)."""
    kv = (recipe_file(RECIPES[size]).get("model") or {}).get("num_kv_heads") if size in RECIPES else None
    return None if kv is None else int(kv)


def at_context(config: dict[str, Any], context: int) -> tuple[dict[str, Any], list[str]]:
    """``config`` at ``max_length = context`` and the list of what changed (strings): the backbone's
    ``harness.generate.with_context`` when it exists, else :func:`_with_context`."""
    try:
        with_context = importlib.import_module("harness.generate").with_context
    except (ImportError, AttributeError):
        return _with_context(config, context)
    new, changes = with_context(_model_config(config), context)
    return (new.to_dict() if hasattr(new, "to_dict") else dict(new)), list(changes)


def _with_context(config: dict[str, Any], context: int) -> tuple[dict[str, Any], list[str]]:
    """Stand-in for ``harness.generate.with_context`` (kept minimal): max_length and the changes it implies for
    the position table and the mechanisms whose structure is sized by ``max_seq_len`` (the model passes its
    length as ``max_seq_len`` unless the recipe sets one)."""
    old = int(config["max_length"])
    if context == old:
        return dict(config), []
    changes = [f"max_length {old} -> {context}"]
    table = "learned position table re-initialised" if config.get("pos_emb") == "learned" else \
        "sinusoidal position table computed"
    changes.append(f"{table} for {context} positions")
    name, params = config["attention"], config.get("attention_params") or {}
    if params.get("max_seq_len") is None:
        changes.append(f"attention max_seq_len {old} -> {context}")
        if name == "bigbird":
            block = int(params.get("block_size", 64))
            changes.append(f"bigbird random blocks redrawn for {math.ceil(context / block)} blocks")
        if name == "reformer" and params.get("num_buckets") is None:
            changes.append(f"reformer buckets derived from max_seq_len / bucket_size at {context}")
    return {**config, "max_length": int(context)}, changes


def _model_config(config: dict[str, Any]):
    from harness.model import ModelConfig

    return ModelConfig(**config)


def build(config: dict[str, Any]):
    """The ArenaModel of ``config`` (fresh weights). Raises ValueError (unsupported) when the backbone has no
    decoding API, or for a configuration it refuses."""
    from harness.model import build_model

    model = build_model(config)
    if not all(hasattr(model, m) for m in ("init_states", "prefill", "step")):
        raise ValueError(MISSING_API)
    return model


def state_bytes(states) -> tuple[int, int | None]:
    """(filled bytes, allocated bytes) of a model's decoding states, whole batch, summed over layers (the
    backbone's ``decode_state_bytes`` and ``decode_capacity_bytes``; capacity None where it has none)."""
    model_module = importlib.import_module("harness.model")
    filled = getattr(model_module, "decode_state_bytes", None)
    if filled is None:
        raise ValueError(MISSING_API)
    capacity = getattr(model_module, "decode_capacity_bytes", None)
    return int(filled(states)), (int(capacity(states)) if capacity is not None else None)


def state_growth(mechanism: str, params: dict | None, form: str) -> str | None:
    """How the cell's state grows with the context: the registry's growth of the mechanism's resolved ``params``
    in the decode ``form`` (``recompute``: linear); None where the params do not build a config."""
    info = get_attention_info(mechanism)
    try:
        config = make_config(mechanism, **params) if params is not None else None
    except (TypeError, ValueError):
        return None
    return info.growth(config, form)
