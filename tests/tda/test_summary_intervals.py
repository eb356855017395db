"""The LDS summary's intervals: percentile bootstrap over targets, and paired differences."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tda.errors import DataError
from tda.steps.attribution_summary import _differences, _with_intervals, bootstrap_interval


def lds_rows(
    method: str, values: np.ndarray, aggregation: str = "sum", role: str = "heldout"
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "method": method,
            "aggregation": aggregation,
            "target_id": np.arange(len(values), dtype=np.int64),
            "spearman": values,
            "targets": role,
            "protocol": "paper",
        }
    )


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_targets():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.2, 50), rng.normal(0.3, 0.2, 800)
    lo_s, hi_s = bootstrap_interval(small, 2000)
    lo_l, hi_l = bootstrap_interval(large, 2000)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # about 2 × 1.96 σ/√n wide
    assert hi_s - lo_s == pytest.approx(2 * 1.96 * small.std() / np.sqrt(50), rel=0.2)
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)
    assert bootstrap_interval(small, 2000) == (lo_s, hi_s)  # seeded: the same every time
    nan_lo, nan_hi = bootstrap_interval(np.array([np.nan, 0.2, 0.4, np.nan, 0.3]), 500)
    assert 0.2 - 1e-9 <= nan_lo <= 0.3 <= nan_hi <= 0.4 + 1e-9  # NaN targets (a constant side) are left out
    assert np.isnan(bootstrap_interval(np.array([0.5]), 500)).all()


def test_paired_interval_sees_what_unpaired_ones_cannot():
    """Two methods whose per-target LDS differ by a small constant plus little noise: their own
    intervals overlap, the paired interval of the difference excludes 0."""
    rng = np.random.default_rng(1)
    base = rng.normal(0.3, 0.25, 200)  # targets differ a lot ...
    a, b = base + 0.03 + rng.normal(0, 0.01, 200), base  # ... the methods little
    lds = pl.concat([lds_rows("a", a), lds_rows("b", b)])
    own = _with_intervals(lds, 2000).sort("method")
    assert own["n_targets"].to_list() == [200, 200]
    assert own["lds"].to_list() == pytest.approx([a.mean(), b.mean()])
    assert own["lds_low"][0] < own["lds_high"][1]  # overlapping
    diff = _differences(lds, [("a", "b")], 2000)
    row = diff.row(0, named=True)
    assert row["method"] == "a − b" and row["aggregation"] == "sum" and row["targets"] == "heldout"
    assert row["lds"] == pytest.approx(0.03, abs=0.003) and 0 < row["lds_low"] < 0.03 < row["lds_high"]
    # one row per aggregation and role; only targets both scored are paired
    more = pl.concat(
        [lds, lds_rows("a", a[:100], "attention", "fit"), lds_rows("b", b[:80], "attention", "fit")]
    )
    rows = _differences(more, [("a", "b")], 500).sort("targets")
    assert rows["targets"].to_list() == ["fit", "heldout"] and rows["n_targets"].to_list() == [80, 200]
    with pytest.raises(DataError, match="no LDS rows of method 'c'"):
        _differences(lds, [("a", "c")], 500)
