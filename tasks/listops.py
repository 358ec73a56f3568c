"""ListOps (LRA): classify the value (0-9) of a nested expression of MIN, MAX, MED and SUM_MOD over digits.

Distribution (``lra_benchmarks/data/listops.py``): a node at depth ``d < max_depth`` is an operator with
probability 0.25 (else a digit, uniform 0-9; at ``max_depth`` always a digit); an operator takes
``randint(2, max_args)`` arguments, each a node at depth ``d + 1``, and a uniform operator; MED is
``int(median)``, SM is ``sum % 10``. The token length (operator, arguments, closing ``]``; parentheses not
counted) must satisfy ``min_length < length < max_length`` (LRA: 500 < len < 2000), duplicates are dropped,
and the examples are split 96k/2k/2k.

How we sample it fast and honestly: a tree is grown level by level (breadth-first) with numpy, which gives the
same distribution as LRA's depth-first recursion because every node's choice depends only on its depth. Only
the *shape* is drawn first; its length is known after each level, and an attempt is abandoned as soon as a
lower bound (tokens so far + one token per pending child) reaches ``max_length``; since a length only grows,
this drops only trees that would be rejected anyway. Operators and digits are independent of the shape, so
they are drawn for accepted shapes only. Tokens and labels are then computed bottom-up with segment reductions.
Work is split into fixed chunks, chunk ``i`` seeded by ``(seed, i)`` and merged in order with deduplication, so
the data depend on ``seed`` only, not on ``num_workers``.

Tokens (LRA vocabulary; LRA's input pipeline drops parentheses and keeps ``]`` as a token)::

    0 <pad>, 1 [MIN, 2 [MAX, 3 [MED, 4 [SM, 5..14 digits 0..9, 15 ]          vocab_size = 16

The LRA file format is read and written: ``basic_train.tsv``, ``basic_val.tsv``, ``basic_test.tsv`` with a
header ``Source<TAB>Target`` and sources written with parentheses, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``. With
``data_dir`` the task reads those files (e.g. the official release ``lra_release/listops-1000``) instead of
generating; sequences longer than ``max_length`` are truncated as LRA's pipeline does, and the generation knobs
are unused.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from tasks.base import Arrays, Task, TaskConfig, process_pool, register_task, require
from tasks.cache import file_identity

VOCAB = ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "]")
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OP_BASE = 1  # id of the first operator
DIGIT_BASE = 5  # id of digit 0
END = 15  # id of "]"
VALUE_P = 0.25  # LRA: a node is a leaf when random() > VALUE_P
RELEASE_DIR = "listops-1000"  # inside an extracted lra_release
TSV_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
CHUNK = 500  # accepted trees per generation job (fixed: the data must not depend on the number of workers)


@dataclass(frozen=True)
class ListOpsConfig(TaskConfig):
    """ListOps sizes and difficulty. LRA: 96000/2000/2000, 500 < length < 2000, depth 10, 10 arguments."""

    NON_DATA_FIELDS = ("num_workers",)

    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    min_length: int = 500
    max_length: int = 2_000
    max_depth: int = 10
    max_args: int = 10
    data_dir: str | None = None
    num_workers: int = 2

    def validate(self) -> None:
        require(self.max_length >= 3, "max_length", f"must be >= 3, got {self.max_length}")
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        if self.data_dir is not None:
            # Reading the files: only max_length (truncation) applies; the generation knobs are unused, not checked.
            missing = [f for f in TSV_FILES.values() if not os.path.isfile(os.path.join(self.data_dir, f))]
            require(not missing, "data_dir", f"{self.data_dir!r} lacks {', '.join(missing)} "
                    f"(expected the LRA ListOps files {', '.join(TSV_FILES.values())})")
            return
        for name in ("num_train", "num_val", "num_test"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(0 <= self.min_length < self.max_length - 1, "min_length",
                f"must be >= 0 and < max_length - 1 (lengths are strictly between), got {self.min_length}")
        require(self.max_depth >= 2, "max_depth", f"must be >= 2, got {self.max_depth}")
        require(self.max_args >= 2, "max_args", f"must be >= 2, got {self.max_args}")


# ---- generation --------------------------------------------------------------------------------------------


def _realise(shapes: list, lengths: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw operators/digits for accepted shapes; return (flat token ids uint8 (sum(lengths),), labels).

    All trees are processed together: level ``d`` of the batch is the concatenation of every tree's level ``d``
    (tree-major), which keeps each tree's children right after its own parents' segments.
    """
    depth = max(len(s) for s in shapes)
    levels = []
    for d in range(depth):
        parts = [s[d] for s in shapes if len(s) > d]
        levels.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    ops = [rng.integers(0, len(OPERATORS), size=arity.size) for _, arity in levels]
    digits = [rng.integers(0, 10, size=int((~internal).sum())) for internal, _ in levels]
    # Bottom-up: token size and value of every node.
    sizes: list = [None] * depth
    values: list = [None] * depth
    seg_starts: list = [None] * depth
    for d in range(depth - 1, -1, -1):
        internal, arity = levels[d]
        size = np.ones(internal.size, dtype=np.int64)
        value = np.empty(internal.size, dtype=np.int64)
        value[~internal] = digits[d]
        if arity.size:
            starts = np.concatenate(([0], np.cumsum(arity)[:-1]))
            seg_starts[d] = starts
            csize, cval = sizes[d + 1], values[d + 1]
            size[internal] = 2 + np.add.reduceat(csize, starts)
            seg = np.repeat(np.arange(arity.size), arity)
            counts = np.bincount(seg * 10 + cval, minlength=arity.size * 10).reshape(arity.size, 10).cumsum(1)
            lo = (counts > ((arity - 1) // 2)[:, None]).argmax(1)
            hi = (counts > (arity // 2)[:, None]).argmax(1)
            candidates = np.stack([
                np.minimum.reduceat(cval, starts),
                np.maximum.reduceat(cval, starts),
                (lo + hi) // 2,  # int(np.median): mean of the two middle values, truncated (values are >= 0)
                np.add.reduceat(cval, starts) % 10,
            ])
            value[internal] = candidates[ops[d], np.arange(arity.size)]
        sizes[d], values[d] = size, value
    if not np.array_equal(sizes[0], lengths):
        raise AssertionError("ListOps generator: realised lengths differ from the sampled ones")
    # Top-down: preorder start position of every node in the flat buffer (roots at each tree's offset).
    tokens = np.empty(int(lengths.sum()), dtype=np.uint8)
    start = np.cumsum(lengths) - lengths
    for d, (internal, arity) in enumerate(levels):
        tokens[start[~internal]] = DIGIT_BASE + digits[d]
        if arity.size:
            istart = start[internal]
            tokens[istart] = OP_BASE + ops[d]
            tokens[istart + sizes[d][internal] - 1] = END
            csize = sizes[d + 1]
            excl = np.cumsum(csize) - csize
            start = np.repeat(istart + 1 - excl[seg_starts[d]], arity) + excl
    return tokens, values[0].astype(np.int64)


def _generate_chunk(job: tuple[int, int, int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` accepted trees from stream ``(seed, chunk)``: flat tokens, lengths, labels."""
    seed, chunk, count, min_length, max_length, max_depth, max_args = job
    rng = np.random.default_rng([seed, chunk])
    shapes, lengths = [], []
    while len(shapes) < count:
        if rng.random() > VALUE_P:  # the root is a leaf (75% of attempts): length 1, always rejected
            continue
        levels, length = _sample_shape_from_root(rng, max_depth, max_args, max_length)
        if levels is None or length <= min_length:
            continue
        shapes.append(levels)
        lengths.append(length)
    lens = np.asarray(lengths, dtype=np.int64)
    tokens, labels = _realise(shapes, lens, rng)
    return tokens, lens.astype(np.int32), labels


def _sample_shape_from_root(rng: np.random.Generator, max_depth: int, max_args: int, max_length: int):
    """Like :func:`_sample_shape` but for a root already drawn as an operator."""
    arity = rng.integers(2, max_args + 1, size=1)
    levels = [(np.ones(1, dtype=bool), arity)]
    rest, length = _sample_shape_rest(rng, int(arity[0]), 2, max_depth, max_args, max_length - 2)
    return (None if rest is None else levels + rest), length + 2


def _sample_shape_rest(rng: np.random.Generator, n: int, depth: int, max_depth: int, max_args: int, budget: int):
    """Grow the levels below the root breadth-first; (None, length) once ``budget`` tokens are certain.

    ``levels[d] = (internal: bool (n_d,), arity: int (internal.sum(),))``; children of level d are level d+1 in
    order, ``arity[j]`` of them belonging to the j-th internal node.
    """
    levels, length = [], 0
    for d in range(depth, max_depth + 1):
        internal = rng.random(n) <= VALUE_P if d < max_depth else np.zeros(n, dtype=bool)
        arity = rng.integers(2, max_args + 1, size=int(internal.sum()))
        children = int(arity.sum())
        length += n + arity.size
        levels.append((internal, arity))
        if length + children >= budget:
            return None, length
        if children == 0:
            break
        n = children
    return levels, length


def generate_listops(num_examples: int, seed: int, min_length: int = 500, max_length: int = 2000,
                     max_depth: int = 10, max_args: int = 10,
                     num_workers: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num_examples`` distinct ListOps examples: tokens uint8 (N, max_length) 0-padded, lengths, labels.

    Deterministic in the arguments other than ``num_workers``.
    """
    seen: set[bytes] = set()
    tokens = np.zeros((num_examples, max_length), dtype=np.uint8)
    lengths = np.zeros(num_examples, dtype=np.int32)
    labels = np.zeros(num_examples, dtype=np.int64)
    filled, next_chunk = 0, 0
    pool = process_pool(num_workers) if num_workers > 1 and num_examples > CHUNK else None
    try:
        while filled < num_examples:
            # Duplicates are rare, so ask for what is missing; chunks are fixed-size so the set does not depend
            # on how many are asked for at once.
            n_chunks = -(-(num_examples - filled) // CHUNK)
            jobs = [(seed, next_chunk + i, CHUNK, min_length, max_length, max_depth, max_args) for i in range(n_chunks)]
            next_chunk += n_chunks
            results = pool.imap(_generate_chunk, jobs) if pool else map(_generate_chunk, jobs)
            for flat, lens, labs in results:
                ends = np.cumsum(lens)
                for seq, length, label in zip(np.split(flat, ends[:-1]), lens, labs):
                    if filled == num_examples:
                        break
                    key = seq.tobytes()
                    if key in seen:
                        continue
                    seen.add(key)
                    tokens[filled, :length] = seq
                    lengths[filled], labels[filled] = length, label
                    filled += 1
    finally:
        if pool is not None:
            pool.terminate()
    return tokens, lengths, labels


# ---- the LRA file format ------------------------------------------------------------------------------------


def to_lra_string(tokens: np.ndarray) -> str:
    """The LRA ``Source`` string (with parentheses) of one token-id sequence (no padding).

    LRA nests binary pairs, ``((op, c1), c2) ... (t, "]")``, each pair written ``( a b )``: an operator with k
    arguments opens k + 1 parentheses, every argument is followed by ``)``, and ``]`` is followed by ``)``.
    """
    ids = np.asarray(tokens).tolist()
    pieces: list[str] = [""] * len(ids)
    stack: list[list[int]] = []  # [position of the operator, number of arguments so far]
    done = False
    for i, t in enumerate(ids):
        if done:
            raise ValueError(f"trailing tokens after position {i - 1}")
        if t == END:
            if not stack:
                raise ValueError(f"unmatched ']' at position {i}")
            at, k = stack.pop()
            pieces[at] = "( " * (k + 1) + VOCAB[ids[at]]
            pieces[i] = "] )" + (" )" if stack else "")
            done = not stack
            continue
        if stack:
            stack[-1][1] += 1
        if OP_BASE <= t < OP_BASE + len(OPERATORS):
            stack.append([i, 0])
        elif DIGIT_BASE <= t < DIGIT_BASE + 10:
            pieces[i] = VOCAB[t] + (" )" if stack else "")
            done = not stack
        else:
            raise ValueError(f"token {t} at position {i} is not a ListOps token")
    if stack or not done:
        raise ValueError("incomplete expression (missing ']')")
    return " ".join(pieces)


_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _ch in enumerate("abcd0123456789]"):
    _LUT[ord(_ch)] = _i + 1
_LUT[ord("X")] = END  # LRA's pipeline renames "]" to "X"; accept either


def tokenize_lra_string(source: str) -> np.ndarray:
    """Token ids (uint8) of an LRA ``Source`` string: parentheses dropped, ``]`` kept (``X`` also accepted)."""
    s = source.replace("[MIN", "a").replace("[MAX", "b").replace("[MED", "c").replace("[SM", "d")
    s = s.replace("(", "").replace(")", "").replace(" ", "").replace("\t", "")
    ids = _LUT[np.frombuffer(s.encode("ascii", errors="replace"), dtype=np.uint8)]
    if (ids == 255).any():
        raise ValueError(f"unknown token in ListOps source {source[:80]!r}; allowed: {' '.join(VOCAB[1:])}")
    return ids


def write_lra_tsv(path: str, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
    """Write examples as an LRA ListOps TSV file (header ``Source``, ``Target``)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["Source", "Target"])
        for row, length, label in zip(tokens, lengths, labels):
            writer.writerow([to_lra_string(row[:length]), int(label)])


def read_lra_tsv(path: str, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an LRA ListOps TSV file: tokens uint8 (N, max_length) (longer sequences truncated), lengths, labels."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["Source", "Target"]:
            raise ValueError(f"{path}: expected a header 'Source<TAB>Target', got {header!r}")
        rows = [r for r in reader if r]
    tokens = np.zeros((len(rows), max_length), dtype=np.uint8)
    lengths = np.zeros(len(rows), dtype=np.int32)
    labels = np.zeros(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        try:
            ids = tokenize_lra_string(row[0])[:max_length]
            labels[i] = int(row[1])
        except (ValueError, IndexError) as err:
            raise ValueError(f"{path}: row {i + 2} is not 'Source<TAB>Target' ({err})") from err
        tokens[i, : ids.size] = ids
        lengths[i] = ids.size
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: Target must be in 0..9, got {labels.min()}..{labels.max()}")
    return tokens, lengths, labels


# ---- the task -----------------------------------------------------------------------------------------------


@register_task("listops", config=ListOpsConfig)
class ListOps(Task):
    """ListOps: 10-way classification of nested MIN/MAX/MED/SUM_MOD expressions (LRA, generated)."""

    num_classes = 10
    config: ListOpsConfig

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict) -> str:
        return os.path.join(data_root, RELEASE_DIR)

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def source_identity(self) -> dict:
        if self.config.data_dir is None:
            return {"generator": "listops-bfs-v1"}
        return {s: file_identity(os.path.join(self.config.data_dir, f)) for s, f in TSV_FILES.items()}

    def build(self) -> Arrays:
        c = self.config
        if c.data_dir is not None:
            out = {}
            for split, fname in TSV_FILES.items():
                tokens, lengths, labels = read_lra_tsv(os.path.join(c.data_dir, fname), c.max_length)
                out[split] = {"tokens": tokens, "lengths": lengths, "labels": labels}
            truncated = {s: int((a["lengths"] == c.max_length).sum()) for s, a in out.items()}
            self.build_notes = {"source": {s: os.path.join(c.data_dir, f) for s, f in TSV_FILES.items()},
                                "at_max_length": truncated}
            return out
        total = c.num_train + c.num_val + c.num_test
        tokens, lengths, labels = generate_listops(total, c.seed, c.min_length, c.max_length, c.max_depth,
                                                   c.max_args, c.num_workers)
        bounds = {"train": (0, c.num_train), "validation": (c.num_train, c.num_train + c.num_val),
                  "test": (c.num_train + c.num_val, total)}
        return {s: {"tokens": tokens[a:b], "lengths": lengths[a:b], "labels": labels[a:b]}
                for s, (a, b) in bounds.items()}

    def write_tsv(self, out_dir: str) -> None:
        """Write the three splits as LRA files (``basic_train.tsv`` ...) into ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        for split, fname in TSV_FILES.items():
            a = self._split(split)
            write_lra_tsv(os.path.join(out_dir, fname), a["tokens"], a["lengths"], a["labels"])
