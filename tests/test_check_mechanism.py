"""attentions.testing.check_mechanism fails, naming the check, on mechanisms that break the contract.

Each broken mechanism below is correct except for one fault, so the check that must catch it is the
first to fail: one ignores the padding mask, one claims ``supports_causal`` but looks at later positions,
one claims linear memory but materialises seq x seq scores, one says it applies dropout but does not, one
declares a state size of zero floats, one shares grouped keys in the wrong order (interleaved instead of
consecutive query heads), one says it refuses groups but takes them.
(Every built-in passing is ``tests/test_registry_contract.py``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from attentions import Attention, AttentionConfig, register_attention
from attentions import registry as attention_registry
from attentions.testing import CHECKS, ContractViolation, check_mechanism, cpu_peak_bytes
from harness.measure import measure_peak_memory


def softmax_attention(q, k, v, key_padding_mask=None, causal=False):
    """Plain scaled dot-product attention with an (n x n) score matrix."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ v


@dataclass(frozen=True)
class CausalConfig(AttentionConfig):
    causal: bool = False  # (declared here too, so this file does not depend on the base config having it)


@pytest.fixture
def broken():
    """Registers the broken mechanisms for one test, then removes them."""
    names = []

    def register(name, config=AttentionConfig, **info):
        info = {"family": "exact", "time_complexity": "O(n^2)", "memory_complexity": "O(n^2)",
                "applies_dropout": False, **info}

        def decorate(cls):
            names.append(name)
            return register_attention(name, config=config, **info)(cls)

        return decorate

    @register("test_leaks_padding")
    class LeaksPadding(Attention):
        """Ignores key_padding_mask: padded keys take softmax weight."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v)

    @register("test_peeks_at_future", config=CausalConfig, supports_causal=True)
    class PeeksAtFuture(Attention):
        """Claims a causal form but attends to every key."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)

    @register("test_quadratic_claims_linear", family="kernel", memory_complexity="O(n d)")
    class QuadraticClaimsLinear(Attention):
        """Claims O(n d) memory but builds the n x n score matrix."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)

    @register("test_claims_dropout", applies_dropout=True)
    class ClaimsDropout(Attention):
        """Says it applies dropout to its probabilities but never does."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)

    @register("test_bad_state_size", state_size_fn=lambda config, n: 0)
    class BadStateSize(Attention):
        """Declares a state size of zero floats."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)

    @register("test_interleaves_groups", grouped_kv="shared")
    class InterleavesGroups(Attention):
        """Takes grouped k, v but gives key-value head j to query heads j, j + kv_heads, ... (tile, not
        repeat_interleave): right for kv_heads = 1 or num_heads, wrong in between."""

        def attend(self, q, k, v, key_padding_mask):
            groups = q.shape[1] // k.shape[1]
            return softmax_attention(q, k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1), key_padding_mask)

    @register("test_assumes_one_kv_head", grouped_kv="shared")
    class AssumesOneKVHead(Attention):
        """Declares shared groups but only works when k, v have one head (broadcasting): it raises at two."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)  # matmul broadcasts k, v of one head only

    @register("test_says_refused", grouped_kv="refused")
    class SaysRefused(Attention):
        """Its info refuses grouped keys; the registry then refuses num_kv_heads < num_heads for it."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask)

    @register("test_honest_causal", config=CausalConfig, supports_causal=True)
    class HonestCausal(Attention):
        """Exact softmax attention with a real causal mask: passes every check."""

        def attend(self, q, k, v, key_padding_mask):
            return softmax_attention(q, k, v, key_padding_mask, causal=self.config.causal)

    yield
    for name in names:
        attention_registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize("name,check,detail", [
    ("test_leaks_padding", "padding", "appended"),
    ("test_peeks_at_future", "causality", "prefix ending at"),
    ("test_quadratic_claims_linear", "memory_growth", "per doubling of n"),
    ("test_claims_dropout", "dropout", "says it applies dropout"),
    ("test_bad_state_size", "metadata", "state size at n=1.*must be None or an int >= 1"),
    ("test_interleaves_groups", "grouped_kv", "grouped k, v give another output than the same key-value heads"),
    ("test_assumes_one_kv_head", "grouped_kv", "raised RuntimeError: The size of tensor"),
])
def test_broken_mechanism_fails_naming_the_violation(broken, name, check, detail):
    with pytest.raises(ContractViolation, match=f"'{name}' violates the contract check '{check}'.*{detail}") as err:
        check_mechanism(name)
    assert err.value.check == check and err.value.name == name


def test_every_check_before_the_fault_passes(broken):
    # The faults are single: the checks before the failing one pass, so the message points at the fault.
    order = list(CHECKS)
    assert check_mechanism("test_leaks_padding", checks=order[: order.index("padding")])
    assert check_mechanism("test_peeks_at_future",
                           checks=[c for c in order if c not in ("causality", "decoding", "grouped_kv")])
    assert check_mechanism("test_interleaves_groups", checks=order[: order.index("grouped_kv")])
    assert check_mechanism("test_quadratic_claims_linear", checks=order[:-1])


def test_honest_mechanism_passes_every_check(broken):
    assert check_mechanism("test_honest_causal") == [c for c in CHECKS if c != "memory_growth"]
    # Held to linear memory on request, the exact one fails: the option is not a no-op.
    with pytest.raises(ContractViolation, match="memory_growth"):
        check_mechanism("test_honest_causal", checks=["memory_growth"], linear_memory=True)


def test_unknown_names_are_clear():
    with pytest.raises(ValueError, match="unknown attention 'no_such'"):
        check_mechanism("no_such")
    with pytest.raises(ValueError, match=r"unknown check\(s\) \['speed'\]; allowed: \['metadata'"):
        check_mechanism("full", checks=["speed"])


def test_cpu_peak_matches_the_harness_measurement():
    # attentions may not import the harness, so the contract has its own small measurement; it must read
    # the same allocator peak as the benchmark's.
    x = torch.randn(64, 64)

    def step():
        return (x @ x).exp().sum()

    _, reading = measure_peak_memory(step, "cpu")
    assert cpu_peak_bytes(step) == reading.peak_bytes > 64 * 64 * 4


def test_refused_groups_are_a_clear_error_and_pass_the_check(broken):
    with pytest.raises(ValueError, match="'num_kv_heads'.*'test_says_refused' takes no grouped keys.*one of: .*full"):
        attention_registry.build_attention("test_says_refused", num_heads=4, num_kv_heads=2)
    assert check_mechanism("test_says_refused", checks=["grouped_kv"]) == ["grouped_kv"]
    assert attention_registry.build_attention("test_says_refused", num_heads=4, num_kv_heads=4)


def test_expanded_plugin_sees_num_heads_keys_and_stores_grouped_prefix(broken):
    """A plug-in that declares nothing receives k, v repeated for its query heads (its contract is unchanged), and
    its recompute decoding form stores the prefix's k, v per key-value head."""
    seen = []

    @register_attention("test_records_shapes", config=CausalConfig, family="exact", time_complexity="O(n^2)",
                        memory_complexity="O(n^2)", supports_causal=True, applies_dropout=False)
    class RecordsShapes(Attention):
        def attend(self, q, k, v, key_padding_mask):
            seen.append(tuple(k.shape))
            return softmax_attention(q, k, v, key_padding_mask, causal=self.config.causal)

    try:
        attn = attention_registry.build_attention("test_records_shapes", num_heads=4, num_kv_heads=1, head_dim=8,
                                                  causal=True)
        q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
        attn(q, k, v)
        assert seen == [(2, 4, 6, 8)]
        state = attn.init_state(2, 6)
        attn.prefill(q, k, v, state)
        assert state.k.shape == (2, 1, 6, 8) and state.q.shape == (2, 4, 6, 8)
        with pytest.raises(ValueError, match=r"k, v num_kv_heads=1 heads.*expected q \(2, 4, 6, 8\), k and v "
                                             r"\(2, 1, 6, 8\)"):
            attn(q, q, q)
    finally:
        attention_registry._REGISTRY.pop("test_records_shapes", None)
