"""attentions.config_types: the field checks both registries use (numpy numbers in, plain numbers out)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from attentions import make_config
from attentions.config_types import describe_type, normalised_number, value_matches
from tasks import build_task


@pytest.mark.parametrize("value, annotation, ok", [
    (3, int, True), (np.int64(3), int, True), (True, int, False), (3.0, int, False), ("3", int, False),
    (3, float, True), (np.float32(0.5), float, True), (False, float, False),
    ("kv", Literal["none", "kv"], True), ("qk", Literal["none", "kv"], False),
    (None, int | None, True), ((1, 2), tuple[int, ...], True), ((1, "a"), tuple[int, ...], False),
    ([1, 2], tuple[int, ...], False),
])
def test_value_matches(value, annotation, ok):
    assert value_matches(value, annotation) is ok


def test_describe_and_normalise():
    assert describe_type(Literal["a", "b"]) == "one of 'a', 'b'"
    assert describe_type(int) == "int"
    assert type(normalised_number(np.int64(4), int)) is int
    assert type(normalised_number(2, float)) is float


def test_numpy_numbers_become_plain_in_both_registries():
    config = make_config("sliding_window", num_heads=np.int64(2), head_dim=8, window=np.int32(4), dropout=0)
    assert type(config.num_heads) is int and type(config.window) is int and type(config.dropout) is float
    task = build_task("listops", num_train=np.int64(20), num_val=10, num_test=10, min_length=5, max_length=40)
    assert type(task.config.num_train) is int
    with pytest.raises(ValueError, match="invalid task parameter 'num_train': expected int, got '20'"):
        build_task("listops", num_train="20")
