"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv:2312.04927, Section 3).

A sequence opens with ``num_kv_pairs`` key-value pairs; later positions repeat every key once (a *query*) and
the model must output the value the key was paired with. It measures recall, the ability that explains most
of the quality gap between exact attention and its sub-quadratic replacements, and it is learned in minutes
by a small exact-attention model while a model that cannot look back far enough stays near chance.

Layout (Zoology's ``multiquery_ar``), with ``k = num_kv_pairs`` and ``L = seq_len``::

    position  0   1   2   3  ... 2k-2 2k-1 | 2k ...                                          L-1
    token     k1  v1  k2  v2 ... kk   vk   | filler, and key j at position 2k + 2*gap_j
    label     -100 everywhere except at each query position: v_j (the value paired with that key)

* Vocabulary: 0 is padding (never used: every sequence has length ``L``); keys are ``1 .. V/2 - 1`` and values
  ``V/2 .. V - 1`` (``V = vocab_size``). Keys of one sequence are distinct, so are its values, both drawn
  uniformly in random order.
* Query gaps: the query region holds ``(L - 2k) // 2`` two-token slots; the k slots used are drawn without
  replacement with Zoology's power law ``p(slot s) ∝ a * s^(a-1)`` (s = 1, 2, ...; ``a = power_a``; 0.01
  puts most queries near the start of the region, 1.0 is uniform), and key j (in context order) gets the j-th
  slot drawn, as Zoology's sequential draws do.
* Filler: every other position holds a token drawn uniformly from ``1 .. V-1`` *excluding this sequence's keys*.
  Zoology draws filler from the whole vocabulary; we exclude the keys so that a key occurs exactly twice (its
  pair and its query) and the labels are a function of the tokens alone.

Two forms (the ``form`` parameter):

* ``encoder``: the layout above; any (bidirectional) model predicts the value at each query position.
* ``decoder``: next-token prediction for a causal model (``model.causal=true``): the value also stands in the
  input right after its query (``k_j v_j`` in the query region too), and the label at the query position is
  that next token. A bidirectional model would read the answer, so the harness refuses it (``requires_causal``).

Metrics (the harness): accuracy over the answer positions and the share of sequences with every answer right.

Generation is vectorised numpy in fixed chunks (chunk ``c`` of split ``s`` seeded by ``(seed, s, c)``), so the
data depend only on the parameters; a validation or test sequence identical to an earlier one (e.g. a
training sequence) is dropped and replaced, so evaluation never sees a training sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.base import IGNORE_INDEX, SPLITS, Arrays, Task, TaskConfig, register_task, require

FORMS = ("encoder", "decoder")
CHUNK = 1000  # sequences per generation chunk (fixed: the data must not depend on how they are produced)
_MAX_RANDOM_CELLS = 1 << 22  # bound on the (rows x key vocabulary) random matrix drawn at once


@dataclass(frozen=True)
class MQARConfig(TaskConfig):
    """MQAR sizes and difficulty. Defaults follow Zoology's ``multiquery_ar`` (plus a validation split)."""

    vocab_size: int = 8_192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    form: str = "encoder"
    num_train: int = 100_000
    num_val: int = 1_000
    num_test: int = 3_000

    def validate(self) -> None:
        for name in ("num_train", "num_val", "num_test", "num_kv_pairs"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.form in FORMS, "form", f"must be one of {', '.join(FORMS)}, got {self.form!r}")
        require(0.0 < self.power_a <= 1.0, "power_a", f"must be in (0, 1] (1 = uniform gaps), got {self.power_a}")
        k = self.num_kv_pairs
        require(self.seq_len >= 4 * k, "seq_len",
                f"must be >= 4 * num_kv_pairs = {4 * k} (k pairs plus k two-token query slots), got {self.seq_len}")
        require(self.vocab_size // 2 - 1 >= k, "vocab_size",
                f"must give at least num_kv_pairs={k} keys (keys are 1 .. vocab_size/2 - 1), got {self.vocab_size}")
        require(self.vocab_size <= 65_536, "vocab_size", f"must be <= 65536 (uint16 tokens), got {self.vocab_size}")


# ---- generation -----------------------------------------------------------------------------------------------


def gap_log_weights(num_slots: int, power_a: float) -> np.ndarray:
    """Log of Zoology's (unnormalised) query-gap weights ``a * s^(a-1)`` for slots s = 1..num_slots."""
    s = np.arange(1, num_slots + 1, dtype=np.float64)
    return np.log(power_a) + (power_a - 1.0) * np.log(s)


def sample_without_replacement(rng: np.random.Generator, log_weights: np.ndarray, rows: int, k: int) -> np.ndarray:
    """(rows, k) indices into ``log_weights``, each row k distinct indices in the order successive weighted draws
    without replacement would give them (``np.random.choice(replace=False, p=...)``'s distribution).

    Gumbel-top-k (Plackett-Luce): the k largest of ``log w + Gumbel noise``, sorted descending, are distributed
    as k successive draws without replacement with probabilities proportional to w.
    """
    scores = log_weights[None, :] + rng.gumbel(size=(rows, log_weights.size))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < log_weights.size else np.tile(
        np.arange(log_weights.size), (rows, 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _filler(rng: np.random.Generator, shape: tuple[int, int], vocab_size: int, keys: np.ndarray) -> np.ndarray:
    """Tokens uniform over ``1 .. vocab_size-1`` minus each row's keys: a draw u over the allowed count is shifted
    past every excluded key <= it (keys sorted ascending), which maps it onto the allowed tokens in order."""
    out = rng.integers(1, vocab_size - keys.shape[1], size=shape)
    for key in np.sort(keys, axis=1).T:  # ascending: each shift can only move past later keys
        out += out >= key[:, None]
    return out


def generate_chunk(rng: np.random.Generator, rows: int, vocab_size: int, seq_len: int, num_kv_pairs: int,
                   power_a: float, decoder: bool) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` MQAR sequences: tokens int64 (rows, seq_len), labels int64 (rows, seq_len) with IGNORE_INDEX."""
    k = num_kv_pairs
    half = vocab_size // 2
    keys = 1 + sample_without_replacement(rng, np.zeros(half - 1), rows, k)
    values = half + sample_without_replacement(rng, np.zeros(vocab_size - half), rows, k)
    tokens = _filler(rng, (rows, seq_len), vocab_size, keys)
    tokens[:, 0 : 2 * k : 2] = keys
    tokens[:, 1 : 2 * k : 2] = values
    gaps = sample_without_replacement(rng, gap_log_weights((seq_len - 2 * k) // 2, power_a), rows, k)
    query_pos = 2 * k + 2 * gaps
    np.put_along_axis(tokens, query_pos, keys, axis=1)
    if decoder:
        np.put_along_axis(tokens, query_pos + 1, values, axis=1)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    return tokens, labels


def generate_mqar(sizes: dict[str, int], seed: int, vocab_size: int, seq_len: int, num_kv_pairs: int,
                  power_a: float, decoder: bool) -> Arrays:
    """The splits named in ``sizes`` (in that order), with no sequence repeated within or across splits."""
    chunk_rows = max(1, min(CHUNK, _MAX_RANDOM_CELLS // max(vocab_size // 2, 1)))
    seen: set[bytes] = set()
    out: Arrays = {}
    for split_id, (split, size) in enumerate(sizes.items()):
        tokens = np.zeros((size, seq_len), dtype=np.uint16)
        labels = np.zeros((size, seq_len), dtype=np.int32)
        filled = chunk = 0
        while filled < size:
            rng = np.random.default_rng([seed, split_id, chunk])
            chunk += 1
            tok, lab = generate_chunk(rng, chunk_rows, vocab_size, seq_len, num_kv_pairs, power_a, decoder)
            tok = tok.astype(np.uint16)
            for row in range(chunk_rows):
                if filled == size:
                    break
                key = tok[row].tobytes()
                if key in seen:
                    continue
                seen.add(key)
                tokens[filled], labels[filled] = tok[row], lab[row]
                filled += 1
        out[split] = {"tokens": tokens, "labels": labels}
    return out


# ---- the task -------------------------------------------------------------------------------------------------


@register_task("mqar", config=MQARConfig)
class MQAR(Task):
    """Multi-query associative recall (Zoology): output the value of every repeated key (token-level)."""

    # One prediction per position; targets are token ids, IGNORE_INDEX where nothing is asked.
    token_level = True
    config: MQARConfig

    @property
    def num_classes(self) -> int:  # type: ignore[override]  # the head predicts a token of the vocabulary
        return self.config.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.seq_len

    @property
    def requires_causal(self) -> bool:  # type: ignore[override]
        """The decoder form's inputs hold each answer one position after its query: only a causal model may
        read them."""
        return self.config.form == "decoder"

    def source_identity(self) -> dict:
        return {"generator": "mqar-v1"}

    def build(self) -> Arrays:
        c = self.config
        sizes = dict(zip(SPLITS, (c.num_train, c.num_val, c.num_test)))
        return generate_mqar(sizes, c.seed, c.vocab_size, c.seq_len, c.num_kv_pairs, c.power_a,
                             c.form == "decoder")
