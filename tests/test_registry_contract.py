"""Contract tests run for every registered mechanism: a new mechanism is tested the day it lands.

The contract itself is :func:`attentions.testing.check_mechanism` (public, so a plug-in's author runs the
same checks); ``tests/test_check_mechanism.py`` shows each check fails on a mechanism that breaks it.
"""

from __future__ import annotations

import pytest

from attentions import available_attentions, build_attention, get_attention_info
from attentions.testing import CHECKS, check_mechanism

from conftest import MAX_LEN, SMALL_PARAMS

MECHANISMS = available_attentions()
EXPECTED = {
    "full", "sliding_window", "longformer", "bigbird", "reformer", "linformer",
    "performer", "rfa", "aft", "clustered", "memory_compressed",
}


def test_registry_lists_known_mechanisms_only():
    assert set(MECHANISMS) <= EXPECTED
    assert "full" in MECHANISMS
    assert MECHANISMS == sorted(MECHANISMS)


def test_wildcard_listing():
    listed = available_attentions("*former")
    assert all(name.endswith("former") for name in listed)
    assert set(listed) == {n for n in MECHANISMS if n.endswith("former")}
    assert available_attentions("full") == ["full"]
    assert available_attentions("no_such_*") == []


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown attention 'fulll'.*full"):
        build_attention("fulll")


CONTRACT_CASES = [(name, check) for name in MECHANISMS for check in CHECKS]


@pytest.mark.parametrize("name,check", CONTRACT_CASES)
def test_contract(name, check):
    # One definition of the contract: attentions.testing.check_mechanism, run one check at a time so a
    # failure names its mechanism and check in the test id too.
    ran = check_mechanism(name, SMALL_PARAMS.get(name), checks=[check])
    if not ran:
        pytest.skip(f"{check} does not apply to {name} (not causal / exact memory)")


def test_max_len_constant_matches_budgets():
    assert MAX_LEN >= 41 + 11


@pytest.mark.parametrize("name", available_attentions())
def test_printed_info_shows_every_default(name):
    """The README's print(get_attention_info(name)) shows the family, complexity, capabilities and defaults."""
    info = get_attention_info(name)
    text = repr(info)
    assert f"family={info.family!r}" in text and "supports_padding_mask=" in text and "defaults={" in text
    for param, default in info.defaults().items():
        assert f"{param!r}: {default!r}" in text
