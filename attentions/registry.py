"""Attention registry: one decorator registers a mechanism, one factory builds it by name.

Each mechanism declares a frozen config dataclass (subclass of :class:`AttentionConfig`)
that is the single source of truth for its parameters and defaults. Unknown parameter
names are rejected (xformers' habit of filling unknown keys with ``None`` hid typos).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from attentions.config_types import describe_type, normalised_number, value_matches
from attentions.decoding import STATE_GROWTHS

# How a mechanism takes grouped keys and values (``num_kv_heads < num_heads``, grouped-query attention):
# 'shared': one cache or key-value summary per key-value head, its group of query heads reading it (attend and the
# decoding hooks receive k, v with num_kv_heads heads); 'expanded': it receives each key-value head repeated for
# its group (copies; a plug-in's default: its contract does not change); 'refused': num_kv_heads < num_heads is a
# ValueError (reformer: keys are its queries).
GROUPED_KV = ("shared", "expanded", "refused")
# What the backbone's rotary position embedding (model.pos_emb=rope) does to a mechanism: 'rotated': the wrapper
# rotates q and k before the mechanism (the default); 'own': the mechanism applies its own rotation (not rotated
# twice); 'refused': pos_emb=rope is a ValueError (aft: no query-key product for a rotation to act on).
ROTARY = ("rotated", "own", "refused")

FAMILIES = (
    "exact",
    "sparse",
    "low-rank",
    "kernel",
    "hashing",
    "attention-free",
    "query-prototyping",
    "memory-compression",
)


@dataclass(frozen=True)
class AttentionConfig:
    """Parameters every mechanism takes. Subclasses add their own fields.

    ``num_heads`` / ``head_dim`` describe the projected inputs the mechanism receives;
    ``max_seq_len`` is required only by mechanisms whose parameters depend on the length
    (their info says ``needs_max_seq_len``); ``seed`` draws every random buffer
    (features, rotations, random blocks) so the same seed gives the same output.
    ``dropout`` is dropout on attention probabilities, active only in training mode.
    ``causal``: the causal-self pattern, query ``i`` attends only to keys ``j <= i`` (decoders);
    allowed only where the mechanism's info says ``supports_causal`` (checked by :func:`make_config`).
    ``num_kv_heads``: key-value heads (grouped-query attention, Ainslie et al. 2023; ``1`` is multi-query
    attention, Shazeer 2019), dividing ``num_heads``; key-value head ``j`` serves the ``num_heads / num_kv_heads``
    consecutive query heads ``j * g ... (j + 1) * g - 1``. None means ``num_heads`` (plain multi-head attention).
    """

    num_heads: int = 4
    head_dim: int = 32
    max_seq_len: int | None = None
    dropout: float = 0.0
    seed: int = 0
    causal: bool = False
    num_kv_heads: int | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        require(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        require(self.head_dim >= 1, "head_dim", f"must be >= 1, got {self.head_dim}")
        if self.max_seq_len is not None:
            require(self.max_seq_len >= 1, "max_seq_len", f"must be >= 1 or None, got {self.max_seq_len}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.num_kv_heads is not None:
            require(1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
                    "num_kv_heads", f"must divide num_heads={self.num_heads} (1 = multi-query attention), got "
                    f"{self.num_kv_heads}")
        self.validate()

    @property
    def kv_heads(self) -> int:
        """Key-value heads: ``num_kv_heads``, or ``num_heads`` when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key-value head, ``num_heads / kv_heads`` (1: plain multi-head attention)."""
        return self.num_heads // self.kv_heads

    def validate(self) -> None:
        """Mechanism-specific checks; raise via :func:`require`."""


def require(condition: bool, param: str, message: str) -> None:
    """Raise a ValueError naming the offending parameter when ``condition`` is false."""
    if not condition:
        raise ValueError(f"invalid parameter '{param}': {message}")


def _check_field_types(config: AttentionConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        annotation = hints[field.name]
        # Hydra / YAML hand lists where we declare tuples.
        if isinstance(value, list) and typing.get_origin(annotation) in (tuple, typing.Union, types.UnionType):
            value = tuple(value)
            object.__setattr__(config, field.name, value)
        if not value_matches(value, annotation):
            raise ValueError(
                f"invalid parameter '{field.name}': expected {describe_type(annotation)}, "
                f"got {value!r} ({type(value).__name__})"
            )
        if (plain := normalised_number(value, annotation)) is not value:
            object.__setattr__(config, field.name, plain)


@dataclass(frozen=True)
class AttentionInfo:
    """What the report and the harness know about a mechanism without building it."""

    name: str
    cls: type
    config_cls: type[AttentionConfig]
    family: str
    time_complexity: str
    memory_complexity: str
    exact: bool = False
    supports_padding_mask: bool = True
    supports_causal: bool = False
    needs_max_seq_len: bool = False
    # Reformer-style mechanisms need keys equal to (normalised) queries: the backbone
    # ties the query and key projections when this is set.
    shared_qk: bool = False
    # False where there is no probability matrix to drop (kernel and AFT mechanisms): ``dropout`` is then
    # accepted but has no effect, and the report says so next to their accuracies.
    applies_dropout: bool = True
    # One line on the causal form: which one the mechanism uses when ``supports_causal``, or why it has
    # none (the ValueError for ``causal=True`` quotes it).
    causal_note: str = ""
    # The hook behind :meth:`state_size`: ``(config, seq_len) -> int | None``, or None when the mechanism
    # declares none (a plug-in that does not say). Declared with ``register_attention(..., state_size_fn=...)``.
    state_size_fn: Callable[[Any, int], int | None] | None = None
    # Incremental decoding (attentions.decoding): whether the mechanism has its own step form (else a causal
    # mechanism decodes by recomputing its causal forward over the prefix), one line naming the form and why it
    # equals the causal forward, and how its state grows with the context: 'constant', 'window' (bounded by a
    # window) or 'linear'.
    supports_decoding: bool = False
    decoding_note: str = ""
    state_growth: str = "linear"
    # Where the growth depends on the parameters (aft's modes): ``config -> growth``; ``state_growth`` is then the
    # default config's. Read both through :meth:`growth`.
    state_growth_fn: Callable[[Any], str] | None = None
    # Grouped-query attention (:data:`GROUPED_KV`) and rotary positions (:data:`ROTARY`), each with one line on
    # what the mechanism does with them (or why it refuses).
    grouped_kv: str = "expanded"
    grouped_kv_note: str = ""
    rotary: str = "rotated"
    rotary_note: str = ""
    description: str = ""

    def defaults(self) -> dict[str, Any]:
        """Every parameter of the mechanism's config with its default value."""
        return {f.name: f.default for f in dataclasses.fields(self.config_cls)}

    def state_size(self, params: Mapping[str, Any], seq_len: int) -> int | None:
        """Floats per head and per layer that one query position's output is computed from (Zoology's state).

        Definition (docs/MQAR.md, "State size"): after the mechanism's own compression, the largest number,
        over the query positions that are not global tokens, of floats the query's output is read from:
        ``head_dim`` floats for every key and every value it reads one by one, and the stored size of every
        summary it reads (a projected or compressed slot, a feature sum ``phi(K)^T [V, 1]``). The query's
        own vector is not counted. Where the set of keys depends on the data (Reformer's buckets), the
        capacity: the most any query can read. Full attention: ``2 n d``, the KV cache.

        ``params``: the mechanism's resolved parameters (a training record's ``attention_config``), with
        ``head_dim`` (required: the count scales with it) and ``causal`` where it applies. ``seq_len``: the
        number of tokens ``n`` the mechanism reads (an int >= 1, at most ``max_seq_len`` when that is set).
        Returns an int >= 1, or None where the mechanism declares no state size.

        Raises ValueError for a ``seq_len`` that is not a positive int or exceeds ``max_seq_len``, a missing
        ``head_dim``, and (via :func:`make_config`) unknown or invalid parameters; TypeError when a
        declaration returns something other than None or a positive int.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
            raise ValueError(f"state size of '{self.name}': seq_len must be an int >= 1, got {seq_len!r}")
        if "head_dim" not in params:
            raise ValueError(f"state size of '{self.name}': params must give head_dim (floats are counted per "
                             f"head_dim); got {sorted(params)}")
        config = make_config(self.name, **params)
        if config.max_seq_len is not None and seq_len > config.max_seq_len:
            raise ValueError(f"state size of '{self.name}': seq_len {seq_len} exceeds max_seq_len="
                             f"{config.max_seq_len} (the mechanism cannot read that many tokens)")
        if self.state_size_fn is None:
            return None
        size = self.state_size_fn(config, int(seq_len))
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1):
            raise TypeError(f"state size declared by '{self.name}' must be None or an int >= 1, got {size!r}")
        return None if size is None else int(size)

    def growth(self, config: AttentionConfig | None = None, form: str = "step") -> str:
        """How the decoding state of ``config`` (None: the defaults) grows with the context: ``constant``, ``window``
        or ``linear``. ``form="recompute"`` (or a mechanism without a step form): ``linear``, the prefix's q, k, v."""
        if form == "recompute" or not self.supports_decoding:
            return "linear"
        if config is None or self.state_growth_fn is None:
            return self.state_growth
        growth = self.state_growth_fn(config)
        if growth not in STATE_GROWTHS:
            raise TypeError(f"state growth declared by '{self.name}' must be one of {STATE_GROWTHS}, got {growth!r}")
        return growth

    def __repr__(self) -> str:
        # What print(get_attention_info(name)) shows: the facts and the parameters' defaults (the classes
        # and the state-size hook are attributes, not worth a line).
        fields = [f for f in dataclasses.fields(self)
                  if f.name not in ("cls", "config_cls", "state_size_fn", "state_growth_fn")]
        facts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields)
        return f"AttentionInfo({facts}, defaults={self.defaults()!r})"


_REGISTRY: dict[str, AttentionInfo] = {}


def register_attention(
    name: str,
    *,
    config: type[AttentionConfig],
    family: str,
    time_complexity: str,
    memory_complexity: str,
    **capabilities: Any,
) -> Callable[[type], type]:
    """Class decorator that registers a mechanism under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family '{family}' of '{name}' is not one of {FAMILIES}")
    if not (dataclasses.is_dataclass(config) and issubclass(config, AttentionConfig)):
        raise TypeError(f"config of '{name}' must be an AttentionConfig dataclass")

    growth = capabilities.get("state_growth", "linear")
    if growth not in STATE_GROWTHS:
        raise ValueError(f"state_growth {growth!r} of '{name}' is not one of {STATE_GROWTHS}")
    for key, allowed in (("grouped_kv", GROUPED_KV), ("rotary", ROTARY)):
        if key in capabilities and capabilities[key] not in allowed:
            raise ValueError(f"{key} {capabilities[key]!r} of '{name}' is not one of {allowed}")
    if capabilities.get("supports_decoding") and not capabilities.get("supports_causal"):
        raise ValueError(f"'{name}' says supports_decoding but has no causal form (supports_causal=False)")

    def decorator(cls: type) -> type:
        old = _REGISTRY.get(name)
        # The same class registering again is a reloaded module (importlib.reload, a notebook cell): it
        # replaces itself. Another class taking a registered name is an error naming both.
        if old is not None and _qualified(old.cls) != _qualified(cls):
            raise ValueError(f"attention '{name}' is registered twice: by {_qualified(old.cls)} and {_qualified(cls)}")
        _REGISTRY[name] = AttentionInfo(
            name=name,
            cls=cls,
            config_cls=config,
            family=family,
            time_complexity=time_complexity,
            memory_complexity=memory_complexity,
            description=(cls.__doc__ or "").strip().split("\n")[0],
            **capabilities,
        )
        cls.name = name
        return cls

    return decorator


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def causal_attentions() -> list[str]:
    """Registered names whose info says ``supports_causal``, sorted."""
    return [n for n in available_attentions() if _REGISTRY[n].supports_causal]


def available_attentions(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell wildcard such as ``'*former'``."""
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_attention_info(name: str) -> AttentionInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention '{name}'; registered: {', '.join(available_attentions())} (a mechanism "
                         "defined outside the package registers when its module is imported: plugins=[module] in "
                         "the apps, or an 'attention_arena.attentions' entry point)")
    return _REGISTRY[name]


def make_config(name: str, **params: Any) -> AttentionConfig:
    """Validated config for ``name``; unknown keys raise a ValueError listing the allowed ones."""
    info = get_attention_info(name)
    allowed = [f.name for f in dataclasses.fields(info.config_cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(repr(u) for u in unknown)} for attention '{name}'; "
            f"allowed: {', '.join(allowed)}"
        )
    # Before the config's own checks: a mechanism without a causal form should say so, not ask for a
    # parameter (linformer's max_seq_len) that would not make causal=True possible either.
    check_causal(name, params.get("causal") is True)
    config = info.config_cls(**params)
    check_grouped_kv(name, config)
    return config


def check_grouped_kv(name: str, config: AttentionConfig) -> None:
    """ValueError when ``config`` groups keys and values (``num_kv_heads < num_heads``) for a mechanism whose info
    says ``grouped_kv='refused'``: says why, lists the mechanisms that take groups."""
    info = get_attention_info(name)
    if config.kv_groups == 1 or info.grouped_kv != "refused":
        return
    takers = [n for n in available_attentions() if _REGISTRY[n].grouped_kv != "refused"]
    reason = f": {info.grouped_kv_note}" if info.grouped_kv_note else ""
    raise ValueError(f"invalid parameter 'num_kv_heads': attention '{name}' takes no grouped keys and values "
                     f"(num_kv_heads={config.num_kv_heads} < num_heads={config.num_heads}){reason}; use num_kv_heads = "
                     f"num_heads, or one of: {', '.join(takers)}")


def check_causal(name: str, causal: bool) -> None:
    """ValueError when ``causal`` is asked of a mechanism without a causal form: says why, lists those with one."""
    if not causal:
        return
    info = get_attention_info(name)
    if not info.supports_causal:
        reason = f": {info.causal_note}" if info.causal_note else ""
        raise ValueError(
            f"invalid parameter 'causal': attention '{name}' has no causal form{reason}; "
            f"causal=True is supported by: {', '.join(causal_attentions()) or 'none'}"
        )


def build_attention(name: str, **params: Any):
    """Build the registered mechanism ``name`` with keyword overrides of its config."""
    config = make_config(name, **params)
    return get_attention_info(name).cls(config)
