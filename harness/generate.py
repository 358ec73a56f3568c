"""Trained models for decoding: rebuild a training run's model, optionally at a longer context.

    loaded = load_trained_model(record)                 # the run's ArenaModel with its best weights
    loaded = load_trained_model(record, context=4096)   # the same configuration at max_length 4096
    config, changes = with_context(model_config, 4096)  # the configuration alone, and what changed

Recall comes from the trained models; decode speed and state bytes are properties of the architecture and its
configuration, so the decode benchmark measures the trained models' configuration at longer contexts, changing only
``max_length`` and what derives from it (issue 24). :func:`with_context` says what that is, as lines a cell can
record ("max_length 64 -> 4096", "layers 0, 1: reformer num_buckets 8 -> 512", ...): it compares the model built
at both lengths (on the meta device: nothing is allocated), so a plug-in's length-derived parameters are listed
too. What changes is the position table and whatever a mechanism derives from ``max_seq_len``; the trained weights
that still fit are loaded, and :func:`load_trained_model` says which did not.

The learned position table at a longer context keeps the trained rows and draws the new ones as at
initialisation (N(0, 0.02)): the model is the trained one on the positions it was trained on, and for timing the
values of the new rows do not matter.

A rope model (``pos_emb=rope``) has no position table: the rotation exists for every position, so nothing of the
positions changes and every trained weight still fits. What bounds its length is its mechanisms' ``max_seq_len``,
and :func:`with_context` raises that as for any model: the mechanisms are built anew at the longer ``max_length``
(what they derive from the length listed; an explicit ``attention_params['max_seq_len']`` set to the new length, a
None one left None). Its positions beyond the trained length are computed as the trained ones, but the model never
saw them: whether it generalises there is the model's business (RoPE does not promise it).

Owns: the model of a training record. Imports: :mod:`harness.model`, :mod:`harness.checkpoint`,
:mod:`harness.plugins` (a record's plug-in mechanisms), ``attentions``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attentions import make_config
from harness.checkpoint import load_checkpoint
from harness.model import ArenaModel, ModelConfig, build_model
from harness.plugins import load_plugins

POS_TABLE = "encoder.pos_emb"


@dataclass
class TrainedModel:
    """A training record's model, ready for decoding (eval mode).

    ``config``: the model's configuration (at ``context`` when one was given); ``checkpoint``: the best.pt whose
    weights were loaded, or None (then the weights are the run's initialisation: same seed); ``changes``: what
    differs from the trained model, one line each (empty at the trained length with a checkpoint).
    """

    model: ArenaModel
    config: ModelConfig
    record_id: str | None
    checkpoint: Path | None
    changes: list[str] = field(default_factory=list)


def as_model_config(config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from itself or from a dict of its fields (a record's ``model_config``); fields this
    version does not know are a ValueError naming them."""
    if isinstance(config, ModelConfig):
        return dataclasses.replace(config, attention_params=dict(config.attention_params))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"model config fields {unknown} are unknown to this version's ModelConfig ({sorted(known)})")
    return ModelConfig(**dict(config))


def with_context(model_config: ModelConfig | Mapping[str, Any], context: int) -> tuple[ModelConfig, list[str]]:
    """The same configuration at ``max_length = context``, and what that changes, one line each.

    Only ``max_length`` is set; the mechanisms' ``max_seq_len`` follows from it (an explicit
    ``attention_params['max_seq_len']`` is set to the new length too), and with it what each mechanism derives from
    the length (bucket counts, random blocks, length-sized parameters): every difference between the two models'
    mechanism configs, derived sizes, buffers and parameters is listed. Raises ValueError for a ``context`` that is
    not an int >= 1, or one the mechanism refuses (its message).
    """
    old = as_model_config(model_config)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be an int >= 1 (the new max_length), got {context!r}")
    if context == old.max_length:
        return old, []
    params = dict(old.attention_params)
    changes = [f"max_length {old.max_length} -> {context}"]
    if params.get("max_seq_len") is not None:  # as the model sets it: the length it feeds (CLS included)
        params["max_seq_len"] = old.seq_len - old.max_length + context
        changes.append(f"attention_params.max_seq_len {old.attention_params['max_seq_len']} -> "
                       f"{params['max_seq_len']}")
    new = dataclasses.replace(old, max_length=context, attention_params=params)
    new.check_attention()  # a mechanism that refuses the length says so here
    with torch.device("meta"):  # shapes and derived sizes only: nothing allocated, even at 64K
        before, after = build_model(old), build_model(new)
    changes += _position_changes(old, new)
    changes += _mechanism_changes(before, after)
    return new, changes


def _position_changes(old: ModelConfig, new: ModelConfig) -> list[str]:
    if old.pos_emb == "rope":
        unseen = f"; positions {old.seq_len} and on were not seen in training" if new.seq_len > old.seq_len else ""
        return [f"rope: no position table, q and k rotated at every position as before{unseen}"]
    if old.pos_emb == "learned":
        grown = f"rows from {old.seq_len} on drawn N(0, 0.02) as at initialisation" if new.seq_len > old.seq_len \
            else f"its first {new.seq_len} rows"
        return [f"learned position table {old.seq_len} -> {new.seq_len} rows ({grown}; trained rows kept when "
                "loaded from a checkpoint)"]
    return [f"sinusoidal position table {old.seq_len} -> {new.seq_len} rows (the same values at the positions both "
            "have)"]


def _mechanism_changes(before: ArenaModel, after: ArenaModel) -> list[str]:
    """Differences between the two models' mechanisms, layer by layer, merged across layers with one text."""
    by_text: dict[str, list[int]] = {}
    for layer, (a, b) in enumerate(zip(before.encoder.blocks, after.encoder.blocks)):
        for text in _attention_diff(a.attn.attention, b.attn.attention):
            by_text.setdefault(text, []).append(layer)
    return [f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}: {text}"
            for text, layers in by_text.items()]


def _attention_diff(a: nn.Module, b: nn.Module) -> list[str]:
    """What differs between two builds of one mechanism at two lengths: config fields, scalar attributes derived
    from them (reformer's num_buckets), buffers and parameters whose shapes changed."""
    name = getattr(a, "name", type(a).__name__)
    out = [f"{name} {k} {v} -> {getattr(b.config, k)}" for k, v in asdict(a.config).items()
           if getattr(b.config, k) != v]
    out += [f"{name} {k} {v} -> {vars(b)[k]} (derived from max_seq_len)" for k, v in vars(a).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and vars(b).get(k) != v]
    for kind, old, new in (("buffer", dict(a.named_buffers()), dict(b.named_buffers())),
                           ("parameter", dict(a.named_parameters()), dict(b.named_parameters()))):
        for key, t in old.items():
            if key in new and tuple(new[key].shape) != tuple(t.shape):
                how = "drawn anew for the new length (same seed)" if kind == "buffer" else \
                    "initialised anew (the trained values do not fit)"
                out.append(f"{name} {kind} {key} {tuple(t.shape)} -> {tuple(new[key].shape)}: {how}")
    return out


# ------------------------------------------------------------------------------------------- records -> models


def read_train_record(record: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A training record as a dict: itself, the JSON file at a path, or the file a ``load_records`` row names
    (``_path``). ValueError when it holds no ``model_config`` (not a train record, or a run that never started)."""
    if isinstance(record, str | Path):
        record = json.loads(Path(record).read_text(encoding="utf-8"))
    elif "model_config" not in record and isinstance(record.get("_path"), str):
        record = json.loads(Path(record["_path"]).read_text(encoding="utf-8"))
    if not isinstance(record, Mapping) or not isinstance(record.get("model_config"), Mapping):
        rid = record.get("record_id") if isinstance(record, Mapping) else None
        raise ValueError(f"record {rid!r} has no model_config: not a training record, or its run failed before the "
                         "model was built")
    return dict(record)


def best_checkpoint(record: Mapping[str, Any], results_dir: str | Path | None = None) -> Path | None:
    """The record's best.pt: in its ``checkpoint_dir``, else ``<results_dir>/checkpoints/<record_id>/`` (a results
    store moved since), else None (``keep_checkpoints=false``, or deleted)."""
    places = [Path(record["checkpoint_dir"])] if record.get("checkpoint_dir") else []
    if results_dir is not None and record.get("record_id"):
        places.append(Path(results_dir) / "checkpoints" / str(record["record_id"]))
    return next((p / "best.pt" for p in places if (p / "best.pt").is_file()), None)


def load_trained_model(record: Mapping[str, Any] | str | Path, context: int | None = None, *,
                       results_dir: str | Path | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """The ArenaModel of a training ``record`` (dict, record file, or ``load_records`` row), in eval mode.

    Built from the record's ``model_config`` (its plug-ins loaded first), checked against its ``attention_config``
    (the fields both know must agree, or the code changed what was trained: ValueError), then the best checkpoint's
    weights loaded when present (:func:`best_checkpoint`; otherwise the run's initialisation, drawn from its seed).
    With ``context``: the configuration from :func:`with_context`; weights whose shape no longer fits are left as
    initialised except the learned position table, whose trained rows are kept; every change is listed.
    """
    record = read_train_record(record)
    load_plugins(list(record.get("plugins") or []))
    trained = as_model_config(record["model_config"])
    _check_attention_config(trained, record.get("attention_config"), record.get("record_id"))
    config, changes = with_context(trained, context) if context is not None else (trained, [])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # as arena-train: the same initialisation where nothing is loaded
        model = build_model(config)
    path = best_checkpoint(record, results_dir)
    if path is None:
        changes.append("no checkpoint found: the weights are the run's initialisation (seed "
                       f"{config.seed}), not the trained ones")
    else:
        changes += _load_weights(model, load_checkpoint(path)["model"])
    return TrainedModel(model.to(device).eval(), config, record.get("record_id"), path, changes)


def _check_attention_config(config: ModelConfig, recorded: Mapping[str, Any] | None, record_id: Any) -> None:
    if not recorded:
        return
    built = asdict(_built_attention_config(config))
    differ = {k: (recorded[k], built[k]) for k in recorded.keys() & built.keys() if recorded[k] != built[k]
              and not (isinstance(built[k], tuple) and list(built[k]) == recorded[k])}
    if differ:
        raise ValueError(f"record {record_id!r}: its model config now builds a different mechanism than it trained: "
                         + ", ".join(f"{k} recorded {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items())))


def _built_attention_config(config: ModelConfig):
    """Layer 0's mechanism config as the model builds it (what a record's ``attention_config`` holds)."""
    return make_config(config.attention, **config.attention_kwargs(0))


def _load_weights(model: ArenaModel, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ``weights`` into ``model`` where shapes fit; the learned position table's trained rows are kept at a
    longer context. Returns a line per tensor not loaded as a whole. Missing or unexpected keys: ValueError."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    fitting, notes = {}, []
    for key, value in weights.items():
        if own[key].shape == value.shape:
            fitting[key] = value
        elif key == POS_TABLE and own[key].shape[1:] == value.shape[1:]:
            rows = min(value.shape[0], own[key].shape[0])
            fitting[key] = torch.cat([value[:rows], own[key][rows:]])
            notes.append(f"{key}: trained rows 0..{rows - 1} loaded, the others as initialised")
        else:
            fitting[key] = own[key]
            notes.append(f"{key}: trained {tuple(value.shape)} does not fit {tuple(own[key].shape)}; as initialised")
    model.load_state_dict(fitting)
    return notes
