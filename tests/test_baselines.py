"""Issue 23's two exact baselines in the report (full, and full_reference: the materialised n x n matrix) and
LRA Table 2's published ratios beside ours; the fairness protocol's fields."""

from __future__ import annotations

import pandas as pd
import pytest
from torch import nn

from harness.bench.protocol import module_settings, protocol
from harness.report.published import LRA_TABLE_2, PublishedEfficiency
from harness.report.tables import published_ratio_table, relative_table


def test_lra_table_2_ratios_are_the_papers():
    # LRA Table 2 prints Performer 5.7x and Local Attention 5.3x at 4K; memory 1.06 and 1.37 of 9.48 GB.
    speed, memory = LRA_TABLE_2.ratios("performer", 4096)
    assert speed == pytest.approx(5.71, abs=0.01) and memory == pytest.approx(0.11, abs=0.005)
    speed, memory = LRA_TABLE_2.ratios("sliding_window", 4096)
    assert speed == pytest.approx(5.29, abs=0.01) and memory == pytest.approx(0.14, abs=0.005)
    assert LRA_TABLE_2.ratios("reformer", 4096)[0] == pytest.approx(0.79, abs=0.01)  # printed "(0.8x)"
    assert LRA_TABLE_2.ratios("full_reference", 1024) == (1.0, 1.0)
    assert LRA_TABLE_2.ratios("rfa", 1024) is None and LRA_TABLE_2.ratios("performer", 8192) is None


def test_a_published_table_with_a_missing_number_is_refused():
    with pytest.raises(ValueError, match="do not match the lengths"):
        PublishedEfficiency("x", "s", "setup", (1, 2), {"A": (1.0,)}, {"A": (1.0, 2.0)}, {}, "A")


def _cells():
    rows = []
    for n, scale in ((1024, 1.0), (4096, 16.0)):
        rows += [
            {"mechanism": "full", "pass": "fwd+bwd", "n": n, "outcome": "ok", "reason": None,
             "median_s": 0.01 * scale, "peak_bytes": 1e6 * scale ** 0.5},
            {"mechanism": "full_reference", "pass": "fwd+bwd", "n": n, "outcome": "ok", "reason": None,
             "median_s": 0.04 * scale, "peak_bytes": 1e7 * scale},
            {"mechanism": "performer", "pass": "fwd+bwd", "n": n, "outcome": "ok", "reason": None,
             "median_s": 0.02 * scale ** 0.5, "peak_bytes": 2e6 * scale ** 0.5},
        ]
    return pd.DataFrame(rows)


def test_relative_to_either_baseline():
    cells = _cells()
    assert relative_table(cells, "fwd+bwd").loc["performer", "n=1024"] == "0.50x / 2.00"
    assert relative_table(cells, "fwd+bwd", "full_reference").loc["performer", "n=1024"] == "2.00x / 0.20"
    assert relative_table(cells, "fwd+bwd", "full_reference").loc["full", "n=4096"] == "4.00x / 0.03"


def test_ours_beside_lra_table_2_against_the_same_baseline():
    table = published_ratio_table(_cells())
    assert list(table.columns) == ["n=1024", "n=4096"] and list(table.index) == ["full", "performer"]
    assert table.loc["performer", "n=4096"] == "ours 8.00x / 0.05; LRA 5.71x / 0.11"
    assert table.loc["full", "n=1024"] == "ours 4.00x / 0.10; LRA —"  # LRA has no fused exact kernel
    assert published_ratio_table(_cells()[lambda d: d["mechanism"] != "full_reference"]).empty


def test_protocol_fields_are_the_same_for_ours_and_the_peer():
    ours = protocol(layout="a", masks="none", backend="sdpa", warmup=2, repeats=5, cpu_allocator="default",
                    pass_="fwd+bwd")
    peer = protocol(layout="a", masks="none", backend="peer", warmup=2, repeats=5, cpu_allocator="default",
                    pass_="fwd+bwd")
    assert set(ours) == set(peer) >= {"layout", "masks", "warmup", "threads", "cpu_allocator", "dropout_policy",
                                      "backend", "timing", "memory", "mode"}
    assert {k for k in ours if ours[k] != peer[k]} == {"backend"}


def test_module_settings_reads_the_peers_scalars_as_built():
    module = nn.Linear(3, 4)
    module.nb_features, module.causal, module._private = 256, False, 1
    assert module_settings(module) == {"causal": False, "in_features": 3, "nb_features": 256, "out_features": 4}
