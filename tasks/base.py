"""Task registry, the :class:`Task` base class, and batching.

A task is a frozen config dataclass (its parameters and defaults: the one source of truth) plus a
:class:`Task` subclass that turns the config into compact numpy arrays, one set per split::

    {"tokens": uint8/uint16 (N, L), "labels": int64 (N,), optional "lengths": int32 (N,),
     and for two-sequence tasks "tokens2" (N, L) with optional "lengths2"}

A token-level task (``token_level = True``, e.g. MQAR) stores one label per position, ``labels`` (N, L), with
``IGNORE_INDEX`` where there is nothing to predict.

Stored values are *raw* (bytes, pixels, ListOps token ids); the batch adds ``token_offset`` so that token id 0
is always padding and real tokens are ``>= 1``. ``lengths`` says how many leading positions are real (absent:
all ``L`` are real). The arrays are cached on disk by :mod:`tasks.cache` and memory-mapped, and a batch is made
by one fancy-indexing gather per array: no per-example Python work, so loading never starves training.

Contract (used by the harness)::

    task = build_task("listops", cache_dir=".arena_cache", data_root=None, seed=0, **task_params)
    task.num_classes, task.vocab_size, task.max_length, task.two_sequence, task.pad_id   # pad_id == 0
    task.num_examples(split); task.labels(split); task.notes; task.validation_is_test
    for batch in task.batches(split, batch_size, shuffle=True, seed=0, epoch=e): ...
"""

from __future__ import annotations

import dataclasses
import fnmatch
import multiprocessing
import os
import signal
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from attentions.config_types import describe_type, normalised_number, value_matches

SPLITS = ("train", "validation", "test")
# Label of a position with nothing to predict in a token-level task (PyTorch's cross_entropy default).
IGNORE_INDEX = -100


def require(condition: bool, param: str, message: str) -> None:
    """Raise a ValueError naming the offending task parameter when ``condition`` is false."""
    if not condition:
        raise ValueError(f"invalid task parameter '{param}': {message}")


@dataclass(frozen=True)
class TaskConfig:
    """Parameters every task takes. Subclasses add their own fields.

    ``seed`` fixes everything random about the data (generation, splits). Fields listed in
    ``NON_DATA_FIELDS`` (e.g. ``num_workers``) do not change the data and are left out of the cache key.
    """

    NON_DATA_FIELDS: ClassVar[tuple[str, ...]] = ()

    seed: int = 0

    def __post_init__(self) -> None:
        _check_field_types(self)
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        self.validate()

    def validate(self) -> None:
        """Task-specific checks; raise via :func:`require`."""

    def data_settings(self) -> dict[str, Any]:
        """The fields that change the data (everything but ``NON_DATA_FIELDS``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.NON_DATA_FIELDS}


def _check_field_types(config: TaskConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        annotation = hints[field.name]
        if isinstance(value, os.PathLike):  # paths may come as pathlib.Path
            value = os.fspath(value)
            object.__setattr__(config, field.name, value)
        if not value_matches(value, annotation):
            raise ValueError(f"invalid task parameter '{field.name}': expected {describe_type(annotation)}, "
                             f"got {value!r} ({type(value).__name__})")
        # numpy scalars and ints-for-floats become plain numbers so the cache key is stable.
        if (plain := normalised_number(value, annotation)) is not value:
            object.__setattr__(config, field.name, plain)

Arrays = dict[str, dict[str, np.ndarray]]


class Task:
    """Base class of every task: subclasses set the class attributes and implement :meth:`build`.

    Construction is cheap and lazy; data is built (or loaded from the cache) on :meth:`prepare` or on the
    first access to examples.
    """

    name: ClassVar[str] = ""
    num_classes: ClassVar[int] = 2
    two_sequence: ClassVar[bool] = False
    # One label per position (labels (N, L), IGNORE_INDEX where nothing is asked) instead of one per sequence.
    token_level: ClassVar[bool] = False
    # Whether only a causal model may be trained on it (e.g. the inputs hold each target one position later).
    requires_causal: ClassVar[bool] = False
    pad_id: ClassVar[int] = 0
    # Added to every stored value of a real position (bytes/pixels are stored raw and shifted by 1 here).
    token_offset: ClassVar[int] = 0
    # Splits served by another stored split (Text with validation="test": LRA evaluated on test as validation).
    # A subclass may set it per instance from its config.
    split_aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, config: TaskConfig, cache_dir: str | None = None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self._data: Arrays | None = None
        # What build() reports beside the arrays (stored in the cache manifest): "source" (where each split was
        # read from), "skipped" ([{"path", "reason"}]). After prepare(), ``notes`` holds them from the cache.
        self.build_notes: dict[str, Any] = {}
        self.notes: dict[str, Any] = {}

    @classmethod
    def release_data_dir(cls, data_root: str, params: dict[str, Any]) -> str | None:
        """The ``data_dir`` of this task inside an extracted ``lra_release`` folder ``data_root`` (None: not there).

        ``params`` are the task parameters with their defaults filled in. Tasks without release files return None.
        """
        return None

    @property
    def validation_is_test(self) -> bool:
        """True when the validation split *is* the test split (LRA's Text protocol); reports mark such runs."""
        return self.split_aliases.get("validation") == "test"

    # ---- what subclasses provide -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the embedding table needed: every token id is in ``[0, vocab_size)``."""
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """Fixed padded length ``L`` of every batch (as LRA pads)."""
        raise NotImplementedError

    def source_identity(self) -> dict[str, Any]:
        """Identity of external inputs (files: path + size + mtime; hub names) that the data depends on."""
        return {}

    def build(self) -> Arrays:
        """Generate or load the data: ``{split: {"tokens", "labels", ["lengths", "tokens2", "lengths2"]}}``."""
        raise NotImplementedError

    # ---- data access ----------------------------------------------------------------------------------------
    def cache_settings(self) -> dict[str, Any]:
        """Everything that changes the data; hashed into the cache key."""
        return {"task": self.name, "config": self.config.data_settings(), "source": self.source_identity()}

    def prepare(self) -> None:
        """Generate/load and cache the data now. Idempotent; fast (memory-mapped) when cached."""
        if self._data is None:
            from tasks.cache import entry_dir, load_or_build, read_notes

            settings = self.cache_settings()
            data = load_or_build(self.cache_dir, self.name, settings, self.build, notes=lambda: self.build_notes)
            self._check_arrays(data)
            self.notes = read_notes(entry_dir(self.cache_dir, self.name, settings))
            self._data = data

    def _check_arrays(self, data: Arrays) -> None:
        stored = set(data)
        needed = {self.split_aliases.get(s, s) for s in SPLITS}
        if not needed <= stored:
            raise RuntimeError(f"task {self.name!r}: built splits {sorted(stored)}, missing {sorted(needed - stored)}")
        for split, arrays in data.items():
            fields = ("tokens", "tokens2") if self.two_sequence else ("tokens",)
            for f in fields:
                if arrays[f].ndim != 2 or arrays[f].shape[1] != self.max_length:
                    raise RuntimeError(f"task {self.name!r} split {split}: {f} has shape {arrays[f].shape}, "
                                       f"expected (N, {self.max_length})")

    def _split(self, split: str) -> dict[str, np.ndarray]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.prepare()
        assert self._data is not None
        return self._data[self.split_aliases.get(split, split)]

    def num_examples(self, split: str) -> int:
        """Number of examples in ``split`` (one of train, validation, test)."""
        return int(self._split(split)["labels"].shape[0])

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split`` as an int64 array (for majority-class baselines)."""
        return np.array(self._split(split)["labels"], dtype=np.int64)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches ``{"tokens", "mask", "labels"[, "tokens2", "mask2"]}`` of ``split``.

        ``tokens`` is int64 ``(B, max_length)`` with 0 at padding, ``mask`` bool ``(B, max_length)`` True at real
        tokens, ``labels`` int64 ``(B,)``. With ``shuffle`` the order is a permutation drawn from
        ``(seed, epoch)``: the same pair gives the same order, another epoch another order.
        """
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        arrays = self._split(split)
        n = int(arrays["labels"].shape[0])
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            # A slice reads contiguously from the memory map; a shuffled batch is one fancy-indexing gather.
            index: slice | np.ndarray = slice(start, end) if order is None else order[start:end]
            yield self._gather(arrays, index)

    def _gather(self, arrays: dict[str, np.ndarray], index: slice | np.ndarray) -> dict[str, torch.Tensor]:
        batch = {"labels": torch.from_numpy(np.array(arrays["labels"][index], dtype=np.int64))}
        pairs = (("tokens", "lengths", "mask"), ("tokens2", "lengths2", "mask2"))
        for tok_key, len_key, mask_key in pairs if self.two_sequence else pairs[:1]:
            tokens = torch.from_numpy(np.asarray(arrays[tok_key][index]).astype(np.int64))
            if len_key in arrays:
                lengths = torch.from_numpy(np.array(arrays[len_key][index], dtype=np.int64))
                mask = torch.arange(tokens.shape[1]) < lengths[:, None]
            else:
                mask = torch.ones(tokens.shape, dtype=torch.bool)
            if self.token_offset:
                tokens += self.token_offset
            if len_key in arrays:
                tokens.masked_fill_(~mask, self.pad_id)
            batch[tok_key] = tokens
            batch[mask_key] = mask
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ---- registry ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What the harness knows about a task without building it."""

    name: str
    cls: type[Task]
    config_cls: type[TaskConfig]
    description: str = ""

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.config_cls)}


_REGISTRY: dict[str, TaskInfo] = {}


def register_task(name: str, *, config: type[TaskConfig], description: str = "") -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a :class:`Task` subclass under ``name`` with its config dataclass."""

    def decorator(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"task {name!r} is already registered by {_REGISTRY[name].cls.__qualname__}")
        if not (isinstance(config, type) and issubclass(config, TaskConfig)):
            raise TypeError(f"config of task {name!r} must subclass TaskConfig")
        cls.name = name
        doc = description or (cls.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = TaskInfo(name=name, cls=cls, config_cls=config, description=doc)
        return cls

    return decorator


def available_tasks(pattern: str = "*") -> list[str]:
    """Sorted names of registered tasks matching the glob ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_task_info(name: str) -> TaskInfo:
    """Registry entry of ``name``; unknown names raise a ValueError listing the allowed ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(available_tasks())}")
    return _REGISTRY[name]


def build_task(name: str, cache_dir: str | None = None, data_root: str | None = None, **params: Any) -> Task:
    """Build the task ``name`` with its parameters (``seed`` included). Lazy: no data is touched yet.

    ``data_root`` is an extracted ``lra_release`` folder: a task with release files reads them from there
    (``listops-1000/``, ``tsv_data/``, ``pathfinder32/...``; Text/Image from ``imdb/``/``cifar10/`` when present,
    see ``docs/DATA.md``) unless ``data_dir`` is given. Unknown names or parameters raise a ValueError naming them
    and listing the allowed ones; a ``data_root`` that is not a directory raises a ValueError.
    """
    info = get_task_info(name)
    allowed = [f.name for f in dataclasses.fields(info.config_cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for task {name!r}; "
                         f"allowed: cache_dir, data_root, {', '.join(allowed)}")
    if data_root is not None and params.get("data_dir") is None:
        data_root = os.fspath(data_root)
        if not os.path.isdir(data_root):
            raise ValueError(f"data_root {data_root!r} is not a directory; expected an extracted lra_release folder")
        data_dir = info.cls.release_data_dir(data_root, {**info.defaults(), **params})
        if data_dir is not None:
            params = {**params, "data_dir": data_dir}
    return info.cls(info.config_cls(**params), cache_dir=cache_dir)


# ---- helpers shared by the byte-level tasks ------------------------------------------------------------------


def bytes_to_rows(texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of each text, truncated to ``max_length``: uint8 (N, max_length) zero-padded, int32 lengths."""
    tokens = np.zeros((len(texts), max_length), dtype=np.uint8)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for i, text in enumerate(texts):
        raw = np.frombuffer((text or "").encode("utf-8")[:max_length], dtype=np.uint8)  # csv reads "" as None
        tokens[i, : raw.size] = raw
        lengths[i] = raw.size
    return tokens, lengths


def subset_rows(n: int, k: int | None, seed: int) -> np.ndarray:
    """Indices of a deterministic random subset of ``k`` of ``n`` rows (kept in file order); all rows if None.

    Random, not the first ``k``: source files are often sorted by label (IMDb is).
    """
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n, k]).permutation(n)[:k])


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_pool(num_workers: int):
    """A ``multiprocessing`` pool of ``num_workers`` processes (fork where available: no re-import, works from any
    entry point; spawn elsewhere) for data generators. Its workers ignore SIGINT: a Ctrl-C in the terminal reaches
    every process of the group, and the parent alone must handle it (it terminates the pool), or each worker prints
    its own traceback and a worker stopped mid-task can leave the pool hanging."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(num_workers, initializer=_ignore_sigint)
