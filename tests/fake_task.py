"""A tiny in-memory task with the tasks API, for harness tests that must not depend on data generation.

Label = first token mod num_classes (learnable in a few dozen steps with CLS pooling);
lengths vary so padding is exercised. Selected in a training config with
``+task.factory=fake_task:build_fake_task task.name=fake``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

SPLITS = ("train", "validation", "test")


class FakeTask:
    pad_id = 0

    def __init__(self, *, seed: int = 0, num_train: int = 256, num_val: int = 64, num_test: int = 64,
                 max_length: int = 24, min_length: int = 4, vocab_size: int = 12, num_classes: int = 3,
                 two_sequence: bool = False) -> None:
        self.name = "fake"
        self.vocab_size, self.max_length, self.num_classes = vocab_size, max_length, num_classes
        self.two_sequence = two_sequence
        self.prepared = 0
        sizes = {"train": num_train, "validation": num_val, "test": num_test}
        rng = np.random.default_rng(seed)
        self._data = {}
        for split in SPLITS:
            arrays = {}
            for key in ("tokens", "tokens2") if two_sequence else ("tokens",):
                lengths = rng.integers(min_length, max_length + 1, size=sizes[split])
                tokens = rng.integers(1, vocab_size, size=(sizes[split], max_length))
                mask = np.arange(max_length)[None, :] < lengths[:, None]
                arrays[key] = np.where(mask, tokens, 0)
                arrays["mask" if key == "tokens" else "mask2"] = mask
            arrays["labels"] = arrays["tokens"][:, 0] % num_classes
            self._data[split] = arrays

    def prepare(self) -> None:
        self.prepared += 1

    def num_examples(self, split: str) -> int:
        return len(self._data[split]["labels"])

    def labels(self, split: str) -> np.ndarray:
        return self._data[split]["labels"].astype(np.int64)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        data = self._data[split]
        n = len(data["labels"])
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield {key: torch.from_numpy(value[idx]).long() if value.dtype != bool else torch.from_numpy(value[idx])
                   for key, value in data.items()}


def build_fake_task(name: str, cache_dir: str = ".arena_cache", seed: int = 0, **params) -> FakeTask:
    """Factory with build_task's signature."""
    allowed = {"num_train", "num_val", "num_test", "max_length", "min_length", "vocab_size", "num_classes",
               "two_sequence"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task 'fake'; allowed: {sorted(allowed)}")
    return FakeTask(seed=seed, **params)
