"""The one transformer encoder every task and mechanism is trained with.

    token + position embeddings -> [CLS] -> N x pre-LN block -> LayerNorm -> pool -> LRA head
    token + position embeddings ->         N x pre-LN block -> LayerNorm -> token head   (token_level)

A pre-LN block is ``x + Drop(MHA(LN(x), mask))`` then ``x + Drop(FFN(LN(x)))``. The
multi-head wrapper owns the Q/K/V/output projections and hands the projected
``(batch, heads, seq, head_dim)`` tensors and the real key padding mask to ANY registered
mechanism, built with ``attentions.build_attention``. The same rules hold for every
mechanism: same projections, fp32 parameters (autocast is the trainer's business), no
gradient checkpointing.

Three heads. As in LRA: a classifier (Dense -> ReLU -> Dense) on the pooled encoding, and
for two-sequence tasks a dual encoder (both sequences through the same encoder, features
``[x1, x2, x1*x2, x1-x2]`` -> Dense -> ReLU -> Dense(mlp/2) -> ReLU -> Dense, as LRA's
``classifier_head_dual``); no cross-attention. For token-level tasks (``token_level``, e.g.
associative recall) the same classifier is applied at every position: logits
``(batch, seq, num_classes)``, no CLS token, no pooling; the targets are per position with
``tasks.base.IGNORE_INDEX`` where nothing is to be predicted.

``token_shift=True`` adds each token's embedding to the next position's input embedding (RWKV's token shift,
Peng et al. 2023, the simplest of the short convolutions Zoology/Based put before attention): a position
carries its left neighbour, which the bidirectional MQAR recipe needs (see ``conf/experiment/quick/mqar.yaml``).

Positions (``pos_emb``): ``sinusoidal`` (Vaswani et al. 2017) or ``learned`` (LRA, N(0, 0.02)), a table of
``seq_len`` rows added to the embeddings; or ``rope`` (RoFormer, Su et al. 2021; ``attentions.rotary``): no table,
the multi-head wrapper rotates each layer's projected q and k by their positions before the mechanism (position
``i`` of the sequence the mechanism sees, the CLS token at 0; in decoding, the prompt's ``0 .. n-1`` and each step's
``lengths[b]``, each sequence its own). The rotation exists for any position, so a rope model's length is bounded by
its mechanisms' ``max_seq_len`` only (:attr:`ModelConfig.context_limit`). ``aft`` (no query-key product) refuses
rope; a mechanism whose info says ``rotary='own'`` rotates q and k itself and receives them unrotated.

``causal=True`` makes every layer's attention causal (the mechanism is built with
``causal=True``; position i sees positions <= i), the decoder pattern. A sequence
classifier then pools with ``last`` (the last real token, the only one that has seen the
whole sequence) or ``mean``; ``cls`` is refused because a CLS token in front would see
only itself.

Language model and incremental decoding (issue 24). A causal token-level model whose ``num_classes`` equals its
``vocab_size`` (the decoder form of MQAR, ``tasks/mqar.py``) is a language model: its token head's logits at
position i are the next-token logits (the distribution of token i + 1). Such a model decodes incrementally through
every layer's :class:`attentions.DecodeState` (:class:`ModelDecodeState` holds them and what the backbone needs per
sequence)::

    states = model.init_states(batch, max_len)          # empty; max_len <= max_length (rope: context_limit)
    logits = model.prefill(tokens, mask, states)         # (batch, n, vocab): the prompt (right-padded)
    logits_t = model.step(next_tokens, states)           # (batch, vocab): one more token per sequence
    new = model.generate(prompt, max_new_tokens, mask)   # greedy: (batch, max_new_tokens)

equal, position by position, the causal forward of the whole sequence (``tests/test_generate.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attentions import (
    DecodeState,
    available_attentions,
    build_attention,
    get_attention_info,
    make_config,
    state_bytes,
)
from attentions.functional import is_right_padded
from attentions.rotary import apply_rotary, rotary_table

POOLINGS = ("cls", "mean", "last")
# sinusoidal and learned: a table added to the embeddings; rope: q and k rotated in every layer (attentions.rotary)
POS_EMBS = ("sinusoidal", "learned", "rope")
ACTIVATIONS = ("gelu", "relu")
# These come from the model config, so a mechanism's params may not set them.
_RESERVED_ATTENTION_PARAMS = ("num_heads", "head_dim", "dropout", "num_kv_heads")


@dataclass
class ModelConfig:
    """Backbone sizes and choices. ``qkv_dim`` = ``num_heads * head_dim`` (LRA's qkv_dim)."""

    vocab_size: int
    max_length: int
    num_classes: int
    embed_dim: int = 64
    num_heads: int = 4
    # Key-value heads (grouped-query attention; 1 = multi-query), dividing num_heads; None = num_heads.
    num_kv_heads: int | None = None
    qkv_dim: int = 64
    mlp_dim: int = 128
    num_layers: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pooling: str = "cls"
    pos_emb: str = "sinusoidal"
    activation: str = "gelu"
    two_sequence: bool = False
    # One prediction per position (set by the harness from the task, like two_sequence).
    token_level: bool = False
    # Causal (decoder) attention in every layer.
    causal: bool = False
    # Add each token's embedding to the next position's input (RWKV's token shift, the simplest short
    # convolution): a position then carries its left neighbour, so a bidirectional model can bind a value to
    # the key before it without learning a previous-token attention head. Causal: it only looks left.
    token_shift: bool = False
    attention: str = "full"
    attention_params: dict[str, Any] = field(default_factory=dict)
    # Base seed of the mechanisms' random state; layer i uses seed + i so layers differ.
    seed: int = 0

    def __post_init__(self) -> None:
        def check(cond: bool, param: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"invalid model parameter '{param}': {allowed}, got {getattr(self, param)!r}")

        for name in ("vocab_size", "max_length", "num_classes", "embed_dim", "num_heads", "qkv_dim", "mlp_dim",
                     "num_layers"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        check(self.qkv_dim % self.num_heads == 0, "qkv_dim", f"must be divisible by num_heads={self.num_heads}")
        kv = self.num_kv_heads
        check(kv is None or (type(kv) is int and 1 <= kv <= self.num_heads and self.num_heads % kv == 0),
              "num_kv_heads", f"must be null or an int dividing num_heads={self.num_heads} (1 = multi-query attention)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")
        check(self.pooling in POOLINGS, "pooling", f"must be one of {POOLINGS}")
        check(self.pos_emb in POS_EMBS, "pos_emb", f"must be one of {POS_EMBS}")
        check(self.activation in ACTIVATIONS, "activation", f"must be one of {ACTIVATIONS}")
        check(isinstance(self.causal, bool), "causal", "must be a bool")
        check(isinstance(self.token_shift, bool), "token_shift", "must be a bool")
        check(not (self.token_level and self.two_sequence), "token_level",
              "cannot be combined with two_sequence (the dual encoder pools each sequence)")
        check(not (self.causal and self.pooling == "cls" and not self.token_level), "pooling",
              "'cls' cannot be used with causal=true (a CLS token in front sees only itself); use 'last' or 'mean'")
        self.attention_params = dict(self.attention_params or {})
        reserved = sorted(set(self.attention_params) & set(_RESERVED_ATTENTION_PARAMS))
        if reserved:
            raise ValueError(
                f"attention_params may not set {reserved}: they come from the model config "
                "(num_heads, qkv_dim / num_heads, attention_dropout, num_kv_heads)"
            )
        get_attention_info(self.attention)  # unknown name -> ValueError listing the registered ones
        if self.pos_emb == "rope":
            self._check_rope()

    def _check_rope(self) -> None:
        """pos_emb=rope needs an even head_dim and a mechanism with a query-key product (info ``rotary`` not
        'refused'); ValueError naming the parameter, why, and what is allowed."""
        if self.head_dim % 2:
            raise ValueError(f"invalid model parameter 'qkv_dim': pos_emb=rope rotates pairs of dimensions, so "
                             f"head_dim = qkv_dim / num_heads must be even, got {self.qkv_dim} / {self.num_heads} = "
                             f"{self.head_dim}")
        info = get_attention_info(self.attention)
        if info.rotary == "refused":
            takers = [n for n in available_attentions() if get_attention_info(n).rotary != "refused"
                      and (get_attention_info(n).supports_causal or not self.causal)]
            reason = f": {info.rotary_note}" if info.rotary_note else ""
            raise ValueError(f"invalid model parameter 'pos_emb': rope cannot be used with attention "
                             f"'{self.attention}'{reason}; use pos_emb=sinusoidal or learned, or one of: "
                             f"{', '.join(takers)}")

    @property
    def head_dim(self) -> int:
        return self.qkv_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key-value heads: ``num_kv_heads``, or ``num_heads`` when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def uses_cls(self) -> bool:
        """Whether a CLS token is prepended (CLS pooling of a sequence-level head)."""
        return self.pooling == "cls" and not self.token_level

    @property
    def seq_len(self) -> int:
        """Length the mechanism sees: the task length plus the CLS token when CLS-pooling."""
        return self.max_length + (1 if self.uses_cls else 0)

    @property
    def context_limit(self) -> int | None:
        """The most tokens a sequence may have (CLS not counted). With a position table (sinusoidal, learned):
        ``max_length``, its rows. With rope the rotation has no limit, the mechanisms' ``max_seq_len`` does:
        ``max_length`` unless ``attention_params`` sets a longer ``max_seq_len``, None (no limit) where it sets None."""
        if self.pos_emb != "rope":
            return self.max_length
        max_seq_len = self.attention_kwargs(0)["max_seq_len"]
        return None if max_seq_len is None else max_seq_len - (1 if self.uses_cls else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def attention_kwargs(self, layer: int) -> dict[str, Any]:
        """The mechanism's parameters in block ``layer``: heads, head_dim, dropout, ``max_seq_len`` (the length it
        is fed), the seed (``seed + layer``, or ``attention_params['seed'] + layer``), causal, and the
        ``attention_params``. ValueError when ``max_seq_len`` is set shorter than the sequence fed."""
        params = {"max_seq_len": self.seq_len, "seed": self.seed + layer, **self.attention_params}
        if "seed" in self.attention_params:
            params["seed"] = self.attention_params["seed"] + layer
        max_seq_len = params["max_seq_len"]
        if max_seq_len is not None and max_seq_len < self.seq_len:
            raise ValueError(
                f"invalid parameter 'max_seq_len' of attention '{self.attention}': {max_seq_len} is shorter than "
                f"the sequence the model feeds it ({self.seq_len} = max_length {self.max_length}"
                f"{' + 1 CLS token' if self.uses_cls else ''})"
            )
        if self.causal:
            params["causal"] = True  # the registry refuses mechanisms without a causal form, naming those with one
        if self.num_kv_heads is not None:
            params["num_kv_heads"] = self.num_kv_heads  # the registry refuses it where keys cannot be grouped
        return dict(params, num_heads=self.num_heads, head_dim=self.head_dim, dropout=self.attention_dropout)

    def check_attention(self) -> None:
        """Validate the mechanism's parameters as the model will build them (ValueError naming the parameter and
        what is allowed), without building anything: so a run can refuse them before its data are made."""
        make_config(self.attention, **self.attention_kwargs(0))


# RoPE's rotations of the positions a forward, prefill or step feeds: complex e^(i p theta), (..., seq, head_dim // 2)
# broadcasting against (batch, heads, seq) (attentions.rotary.rotary_table).
Rotary = torch.Tensor


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed sin/cos position table (Vaswani et al. 2017; max timescale 1e4)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    half = dim // 2
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = position * inv_freq[None, :]
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0 : 2 * half : 2] = torch.sin(angles)
    table[:, 1 : 2 * half : 2] = torch.cos(angles)
    return table.float()


class MultiHeadAttention(nn.Module):
    """Projections around a registered mechanism; the mask is always passed through.

    With ``pos_emb=rope`` the projected q and k are rotated here (``attentions.rotary``), each position by its own
    angle, before any mechanism sees them, from the ``rotary`` table (complex) the Encoder computes once for all
    layers: the forward's and the prefill's positions ``0 .. n-1``, a step's ``state.lengths[b]``. A mechanism whose
    info says ``rotary='own'`` rotates them itself and receives them unrotated."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        info = get_attention_info(config.attention)
        self.num_heads, self.head_dim, self.kv_heads = config.num_heads, config.head_dim, config.kv_heads
        # shared_qk mechanisms (Reformer's LSH) need keys equal to the queries, so one
        # projection produces both: the fused matrix holds [QK; V] instead of [Q; K; V].
        self.shared_qk = info.shared_qk
        # Grouped-query attention: keys and values get kv_heads heads of head_dim (registry refuses shared_qk).
        kv_dim = config.kv_heads * config.head_dim
        self.split = (config.qkv_dim, kv_dim) if self.shared_qk else (config.qkv_dim, kv_dim, kv_dim)
        # One fused matmul for the projections (the same parameter count as separate Linears).
        self.in_proj = nn.Linear(config.embed_dim, sum(self.split))
        self.out_proj = nn.Linear(config.qkv_dim, config.embed_dim)
        self.attention = build_attention(config.attention, **config.attention_kwargs(layer))
        # RoPE here, unless the mechanism carries its own rotation (info 'own'); 'refused' never gets this far.
        self.rotary = config.pos_emb == "rope" and info.rotary == "rotated"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rotary: Rotary | None = None) -> torch.Tensor:
        q, k, v = self._project(x, rotary)
        return self._merge(self.attention(q, k, v, key_padding_mask=mask))

    def prefill(self, x: torch.Tensor, mask: torch.Tensor | None, state: DecodeState,
                rotary: Rotary | None = None) -> torch.Tensor:
        """:meth:`forward` of a prompt ``x`` (batch, n, embed_dim), filling the mechanism's ``state``."""
        q, k, v = self._project(x, rotary)
        out, _ = self.attention.prefill(q, k, v, state, key_padding_mask=mask, x=x)
        return self._merge(out)

    def step(self, x: torch.Tensor, state: DecodeState, rotary: Rotary | None = None) -> torch.Tensor:
        """:meth:`forward` of one new position ``x`` (batch, 1, embed_dim) through the mechanism's ``state``."""
        q, k, v = self._project(x, rotary)
        out, _ = self.attention.step(q, k, v, state, x=x)
        return self._merge(out)

    def _project(self, x: torch.Tensor, rotary: Rotary | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, seq, embed_dim) -> q, k, v (batch, heads, seq, head_dim), q and k rotated with rope; k is q for
        shared_qk (rotated once)."""
        batch, seq, _ = x.shape
        if self.kv_heads != self.num_heads:
            q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2)
                       for t in self.in_proj(x).split(self.split, dim=-1))
            return self._rotate(q, rotary), self._rotate(k, rotary), v
        proj = self.in_proj(x).view(batch, seq, -1, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.shared_qk:
            qk = self._rotate(proj[0], rotary)  # one tensor: the mechanism may test `k is q`
            return qk, qk, proj[1]
        qk = self._rotate(proj[:2], rotary)  # q and k in one pass (the table broadcasts over the leading 2)
        return qk[0], qk[1], proj[2]

    def _rotate(self, t: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        """``t`` (..., seq, head_dim) rotated by the positions' table with rope; as it is otherwise."""
        if not self.rotary:
            return t
        if rotary is None:
            raise ValueError("pos_emb=rope: the attention layer needs its positions' rotary table, which "
                             "the Encoder computes; call the model, not a layer alone")
        return apply_rotary(t, rotary)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(batch, heads, seq, head_dim) -> the output projection (batch, seq, embed_dim)."""
        batch, _, seq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: attention then feed-forward, each with a residual."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim)
        self.attn = MultiHeadAttention(config, layer)
        self.norm2 = nn.LayerNorm(config.embed_dim)
        self.ff1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.ff2 = nn.Linear(config.mlp_dim, config.embed_dim)
        self.act = F.gelu if config.activation == "gelu" else F.relu
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rotary: Rotary | None = None) -> torch.Tensor:
        return self._feed_forward(x + self.dropout(self.attn(self.norm1(x), mask, rotary)))

    def prefill(self, x: torch.Tensor, mask: torch.Tensor | None, state: DecodeState,
                rotary: Rotary | None = None) -> torch.Tensor:
        """:meth:`forward` of a prompt, filling this layer's decoding ``state``."""
        return self._feed_forward(x + self.dropout(self.attn.prefill(self.norm1(x), mask, state, rotary)))

    def step(self, x: torch.Tensor, state: DecodeState, rotary: Rotary | None = None) -> torch.Tensor:
        """:meth:`forward` of one new position (batch, 1, embed_dim) through this layer's ``state``."""
        return self._feed_forward(x + self.dropout(self.attn.step(self.norm1(x), state, rotary)))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.ff1(self.norm2(x))))
        return x + self.dropout(self.ff2(h))


@dataclass
class ModelDecodeState:
    """What a model holds while decoding a batch of sequences (:meth:`ArenaModel.init_states`).

    ``layers``: one :class:`attentions.DecodeState` per block (the mechanism's own business; the backbone reads
    only its public methods); ``lengths``: (batch,) long, tokens so far per sequence (the position the next token
    takes); ``prev_emb``: (batch, embed_dim), token_shift's embedding of each sequence's previous token (zeros
    before the first), None without token_shift; ``max_len``: the most tokens a sequence may reach; ``longest``: the
    longest sequence's length, kept on the host so that a step's bounds check reads no device tensor.
    """

    layers: list[DecodeState]
    lengths: torch.Tensor
    prev_emb: torch.Tensor | None
    max_len: int
    longest: int = 0

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])


def decode_state_bytes(states: ModelDecodeState) -> int:
    """Bytes the decoding states of every layer hold for the context so far, whole batch (the sum over layers of
    :func:`attentions.state_bytes`; divide by the batch for bytes per sequence). The backbone's own per-sequence
    bookkeeping (``lengths``, token_shift's ``prev_emb``: embed_dim floats, the same for every mechanism) is not
    counted."""
    return sum(state_bytes(layer) for layer in states.layers)


def decode_capacity_bytes(states: ModelDecodeState) -> int:
    """Bytes every layer's decoding state has allocated, whole batch (preallocated slots included)."""
    return sum(layer.capacity_bytes() for layer in states.layers)


def limit_text(config: ModelConfig) -> str:
    """What bounds a sequence of the model (:attr:`ModelConfig.context_limit`), for error messages."""
    if config.pos_emb != "rope":
        return f"max_length={config.max_length} (its position table; harness.generate.with_context gives a longer one)"
    return (f"limit of {config.context_limit} tokens (rope has no position table: the limit is the mechanisms' "
            "max_seq_len; harness.generate.with_context, or a longer attention_params.max_seq_len, raises it)")


class Encoder(nn.Module):
    """Embeddings, blocks, final LayerNorm and pooling: tokens (B, L) -> features (B, embed_dim).

    :meth:`encode` stops before pooling: per-position features (B, L, embed_dim) for token-level heads.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        if config.uses_cls:
            # LRA: a zero-initialised learned token prepended before the position embeddings.
            self.cls = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        if config.pos_emb == "learned":
            self.pos_emb = nn.Parameter(torch.randn(config.seq_len, config.embed_dim) * 0.02)  # LRA: N(0, 0.02)
        elif config.pos_emb == "sinusoidal":
            self.register_buffer("pos_emb", sinusoidal_table(config.seq_len, config.embed_dim), persistent=False)
        else:  # rope: no table; every layer rotates its q and k (_positions, MultiHeadAttention)
            self.pos_emb = None
        self.context_limit = config.context_limit
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.embed_dim)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-LayerNorm states (B, L', embed_dim) and their mask (B, L'); L' = L + 1 with a CLS token (first)."""
        cfg = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        batch, length = tokens.shape
        if self.context_limit is not None and length > self.context_limit:
            raise ValueError(f"sequence length {length} exceeds the model's {limit_text(cfg)}")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool with the tokens' shape {tuple(tokens.shape)} (True = real token); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        x = self.token_emb(tokens)
        if cfg.token_shift:
            # Position i gets token i-1's embedding added (position 0 gets nothing). Padding is on the right, so a
            # real position never receives a padded token's embedding.
            x = x + F.pad(x, (0, 0, 1, 0))[:, :-1]
        if cfg.uses_cls:
            x = torch.cat([self.cls.expand(batch, -1, -1), x], dim=1)
            mask = torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        x, rotary = self._positions(x)  # the CLS token, when there is one, is position 0
        for block in self.blocks:
            x = block(x, mask, rotary)
        return self.norm(x), mask

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None, states: ModelDecodeState) -> torch.Tensor:
        """:meth:`encode` of a causal prompt (B, n), right-padded by ``mask`` (checked), filling ``states``: every
        layer's decoding state, each sequence's length (its real tokens) and, with token_shift, the embedding of
        its last real token (zeros for an empty one). Final-LayerNorm states (B, n, embed_dim)."""
        x = self.token_emb(tokens)
        if self.config.token_shift:  # as encode: position i gets token i-1's embedding
            x = x + F.pad(x, (0, 0, 1, 0))[:, :-1]
        x, rotary = self._positions(x)
        for block, state in zip(self.blocks, states.layers):
            x = block.prefill(x, mask, state, rotary)
        lengths = mask.sum(dim=1) if mask is not None else torch.full_like(states.lengths, tokens.shape[1])
        if states.prev_emb is not None and tokens.shape[1] > 0:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            last = self.token_emb(tokens[rows, (lengths - 1).clamp_min(0)])
            states.prev_emb = torch.where((lengths > 0)[:, None], last, torch.zeros_like(last))
        states.lengths = lengths
        states.longest = int(lengths.max()) if lengths.numel() else 0
        return self.norm(x)

    def step(self, tokens: torch.Tensor, states: ModelDecodeState) -> torch.Tensor:
        """One new token per sequence, ``tokens`` (B,), at position ``states.lengths[b]`` (its own position
        embedding; with token_shift, plus the previous token's embedding). Final-LayerNorm state (B, embed_dim)."""
        emb = self.token_emb(tokens)
        x = emb + states.prev_emb if states.prev_emb is not None else emb
        x, rotary = self._positions(x[:, None], states.lengths)  # each sequence at its own position
        for block, state in zip(self.blocks, states.layers):
            x = block.step(x, state, rotary)
        states.lengths = states.lengths + 1
        states.longest += 1
        if states.prev_emb is not None:
            states.prev_emb = emb
        return self.norm(x[:, 0])

    def _positions(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Rotary | None]:
        """Position information for the embeddings ``x`` (B, L, embed_dim), then dropout: at positions ``0 .. L-1``
        (forward, prefill), or with ``lengths`` (B,) one token per sequence at its own position ``lengths[b]`` (a
        step, L = 1). With a table its rows are added (no rotary table); with rope ``x`` is left as it is and the
        positions' rotations come back (``attentions.rotary.rotary_table``: complex, shaped to broadcast against
        (B, heads, L), in float32 or the embeddings' dtype if wider), computed once here for every layer."""
        if self.pos_emb is not None:
            rows = self.pos_emb[: x.shape[1]] if lengths is None else self.pos_emb[lengths][:, None]
            return self.dropout(x + rows), None
        positions = torch.arange(x.shape[1], device=x.device) if lengths is None else lengths[:, None, None]
        return self.dropout(x), rotary_table(positions, self.config.head_dim, x.dtype)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.encode(tokens, mask)
        pooling = self.config.pooling
        if pooling == "cls":
            return x[:, 0]
        if pooling == "last":
            # Right padding: the last real token is at (number of real tokens - 1); an all-padding row uses 0.
            last = (mask.sum(dim=1) - 1).clamp_min(0)
            return x[torch.arange(x.shape[0], device=x.device), last]
        weights = mask.to(x.dtype)[..., None]
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ArenaModel(nn.Module):
    """Encoder + LRA classifier head, the dual-encoder head when ``two_sequence``, or the same classifier at
    every position when ``token_level``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        if config.two_sequence:
            self.head = nn.Sequential(
                nn.Linear(4 * config.embed_dim, config.mlp_dim),
                nn.ReLU(),
                nn.Linear(config.mlp_dim, config.mlp_dim // 2),
                nn.ReLU(),
                nn.Linear(config.mlp_dim // 2, config.num_classes),
            )
        else:
            self.head = nn.Sequential(
                nn.Linear(config.embed_dim, config.mlp_dim), nn.ReLU(), nn.Linear(config.mlp_dim, config.num_classes)
            )

    def forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor | None = None,
        tokens2: torch.Tensor | None = None,
        mask2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, num_classes), or (batch, seq, num_classes) when ``token_level``.

        ``tokens2``/``mask2`` are required iff ``two_sequence``.
        """
        if self.config.token_level:
            if tokens2 is not None:
                raise ValueError("tokens2 given to a token-level model (token_level=True)")
            return self.head(self.encoder.encode(tokens, mask)[0])
        x1 = self.encoder(tokens, mask)
        if not self.config.two_sequence:
            if tokens2 is not None:
                raise ValueError("tokens2 given to a single-sequence model (two_sequence=False)")
            return self.head(x1)
        if tokens2 is None:
            raise ValueError("a two-sequence model needs tokens2 (and mask2)")
        x2 = self.encoder(tokens2, mask2)
        return self.head(torch.cat([x1, x2, x1 * x2, x1 - x2], dim=-1))

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a task batch dict (``tokens``, ``mask`` and, for pairs, ``tokens2``, ``mask2``)."""
        return self(batch["tokens"], batch["mask"], batch.get("tokens2"), batch.get("mask2"))

    # ------------------------------------------------------------------------------------ decoding (issue 24)

    @property
    def is_language_model(self) -> bool:
        """Causal, token-level and ``num_classes == vocab_size``: the token head's logits at position i are the
        next-token logits (the MQAR decoder form, ``tasks/mqar.py``); :meth:`generate` needs this."""
        cfg = self.config
        return cfg.causal and cfg.token_level and cfg.num_classes == cfg.vocab_size

    def init_states(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> ModelDecodeState:
        """Empty decoding states for ``batch`` sequences of up to ``max_len`` tokens (prompt and new tokens).

        ``dtype``/``device``: of the q, k, v the layers will see (default: the model's parameters'). Raises
        ValueError for a model that is not causal and token-level, or ``max_len`` below 1 or above
        :attr:`ModelConfig.context_limit` (``max_length``, the position table's length; with rope the mechanisms'
        ``max_seq_len``).
        """
        self._check_decodable("init_states")
        cfg = self.config
        limit = cfg.context_limit
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1 or \
                (limit is not None and max_len > limit):
            raise ValueError(f"init_states' max_len must be an int >= 1 and at most the model's {limit_text(cfg)}, "
                             f"got {max_len!r}")
        param = next(self.parameters())
        dtype = dtype or param.dtype
        device = torch.device(device) if device is not None else param.device
        layers = [block.attn.attention.init_state(batch, max_len, dtype, device) for block in self.encoder.blocks]
        prev = torch.zeros(batch, cfg.embed_dim, dtype=param.dtype, device=device) if cfg.token_shift else None
        return ModelDecodeState(layers, torch.zeros(batch, dtype=torch.long, device=device), prev, max_len)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None, states: ModelDecodeState) -> torch.Tensor:
        """Feed prompts ``tokens`` (batch, n), ``n >= 0``, right-padded by ``mask`` (bool, True = real; None = all
        real), into empty ``states``. Returns the head's logits (batch, n, num_classes), equal to the causal forward's
        at real positions (padded rows: anything finite). Each sequence then continues from its own end.
        ValueError: not decodable, training mode, states not empty, shapes, a mask not right-padded."""
        self._check_decodable("prefill")
        if tokens.dim() != 2 or tokens.shape[0] != states.batch or tokens.shape[1] > states.max_len:
            raise ValueError(f"prefill's tokens must be (batch={states.batch}, n <= max_len={states.max_len}) "
                             f"(the states'), got shape {tuple(tokens.shape)}")
        if states.longest != 0:
            raise ValueError("prefill needs empty states (from init_states); these hold "
                             f"{states.lengths.tolist()} tokens")
        if mask is not None and (mask.shape != tokens.shape or mask.dtype != torch.bool or not is_right_padded(mask)):
            raise ValueError(f"prefill's mask must be bool with the tokens' shape {tuple(tokens.shape)}, right-padded "
                             f"(real tokens, then padding); got {mask.dtype} {tuple(mask.shape)}")
        return self.head(self.encoder.prefill(tokens, mask, states))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, states: ModelDecodeState) -> torch.Tensor:
        """One new token per sequence, ``tokens`` (batch,) or (batch, 1), each at its sequence's own next position.
        Returns the head's logits (batch, num_classes): for a language model the next-token logits. ValueError:
        not decodable, training mode, wrong shape, or states already at their ``max_len``."""
        self._check_decodable("step")
        tokens = tokens.reshape(-1) if tokens.dim() == 2 and tokens.shape[1] == 1 else tokens
        if tokens.dim() != 1 or tokens.shape[0] != states.batch:
            raise ValueError(f"step's tokens must be (batch,) or (batch, 1) with batch={states.batch} (the states'), "
                             f"got shape {tuple(tokens.shape)}")
        if states.longest >= states.max_len:
            raise ValueError(f"the states are full: a step would exceed their max_len={states.max_len} "
                             "(init_states' max_len)")
        return self.head(self.encoder.step(tokens, states))

    @torch.no_grad()
    def generate(self, prompt_tokens: torch.Tensor, max_new_tokens: int,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: the ``max_new_tokens`` tokens (batch, max_new_tokens) that follow each prompt, each the
        argmax of the next-token logits, through every layer's decoding state (prefill, then one step per token).

        ``prompt_tokens`` (batch, n) right-padded by ``mask`` (None = all real); every sequence needs a real token
        and continues from its own end. Runs in eval mode (restored after). ValueError: not a language model
        (:attr:`is_language_model`), ``max_new_tokens`` not an int >= 0, an empty prompt, or a prompt's real
        tokens plus ``max_new_tokens`` above :attr:`ModelConfig.context_limit` (``max_length``; with rope the
        mechanisms' ``max_seq_len``, which ``harness.generate.with_context`` sets for a longer context).
        """
        self._check_language_model()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        lengths = self._prompt_lengths(prompt_tokens, mask)
        batch, n = prompt_tokens.shape
        longest = int(lengths.max())
        limit = self.config.context_limit
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"generate: the longest prompt ({longest} real tokens) plus max_new_tokens="
                             f"{max_new_tokens} is {longest + max_new_tokens} positions, more than the model's "
                             f"{limit_text(self.config)}")
        if max_new_tokens == 0:
            return prompt_tokens.new_zeros(batch, 0)
        was_training = self.training
        self.eval()
        try:
            states = self.init_states(batch, max(n, longest + max_new_tokens), device=prompt_tokens.device)
            logits = self.prefill(prompt_tokens, mask, states)
            new = [logits[torch.arange(batch, device=logits.device), lengths - 1].argmax(dim=-1)]
            for _ in range(max_new_tokens - 1):
                new.append(self.step(new[-1], states).argmax(dim=-1))
        finally:
            self.train(was_training)
        return torch.stack(new, dim=1)

    def _prompt_lengths(self, prompt_tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Real tokens per prompt (batch,); ValueError for a bad shape, an empty prompt or one too long."""
        if not isinstance(prompt_tokens, torch.Tensor) or prompt_tokens.dim() != 2:
            got = tuple(prompt_tokens.shape) if isinstance(prompt_tokens, torch.Tensor) else type(prompt_tokens)
            raise ValueError(f"prompt_tokens must be a (batch, n) tensor of token ids, got {got}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != prompt_tokens.shape
                                 or mask.dtype != torch.bool):
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be bool with the prompt's shape {tuple(prompt_tokens.shape)} (True = real "
                             f"token, right-padded), got {got}")
        lengths = mask.sum(dim=1) if mask is not None else torch.full(
            prompt_tokens.shape[:1], prompt_tokens.shape[1], device=prompt_tokens.device)
        if prompt_tokens.shape[1] == 0 or bool((lengths == 0).any()):
            raise ValueError("generate needs at least one real prompt token per sequence (the first new token is "
                             "predicted from the last one)")
        limit = self.config.context_limit
        if limit is not None and prompt_tokens.shape[1] > limit:
            raise ValueError(f"prompt_tokens has {prompt_tokens.shape[1]} positions, more than the model's "
                             f"{limit_text(self.config)}")
        return lengths

    def _check_decodable(self, what: str) -> None:
        cfg = self.config
        if not (cfg.causal and cfg.token_level):
            raise ValueError(f"{what}: incremental decoding needs a causal token-level model (model.causal=true and a "
                             f"token-level task); this one has causal={cfg.causal}, token_level={cfg.token_level}")
        if self.training:
            raise ValueError(f"{what}: decoding runs in inference; call model.eval() first (dropout off)")

    def _check_language_model(self) -> None:
        cfg = self.config
        if not self.is_language_model:
            raise ValueError(
                "generate needs a language model: causal, token-level, and num_classes == vocab_size (the token head "
                f"predicts the next token); this model has causal={cfg.causal}, token_level={cfg.token_level}, "
                f"num_classes={cfg.num_classes}, vocab_size={cfg.vocab_size}")

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Parameter count (tied projections counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def attention_backend(self) -> str:
        """Backend string of the first layer's mechanism (meaningful after a forward)."""
        return str(self.encoder.blocks[0].attn.attention.backend)


def build_model(config: ModelConfig | dict[str, Any]) -> ArenaModel:
    """Build the backbone from a :class:`ModelConfig` or a dict of its fields."""
    if isinstance(config, dict):
        allowed = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"unknown model parameter(s) {unknown}; allowed: {sorted(allowed)}")
        config = ModelConfig(**config)
    return ArenaModel(config)
