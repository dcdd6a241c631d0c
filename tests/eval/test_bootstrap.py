"""Bootstrap confidence intervals, paired differences and per-metric summaries."""

import math
import time

import numpy as np
import pytest

from pipeline.metrics import bootstrap_ci, paired_bootstrap_diff, summarize


def test_ci_contains_the_mean_and_point_estimate_is_the_sample_mean():
    values = np.random.default_rng(1).normal(0.5, 0.2, size=80)
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high


def test_ci_narrows_with_more_data():
    rng = np.random.default_rng(2)
    _, lo_small, hi_small = bootstrap_ci(rng.random(30))
    _, lo_big, hi_big = bootstrap_ci(rng.random(3000))
    assert hi_big - lo_big < (hi_small - lo_small) / 3


def test_ci_is_deterministic_for_a_seed_and_varies_across_seeds():
    values = np.random.default_rng(3).random(50)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def test_constant_data_gives_zero_width_interval():
    assert bootstrap_ci([0.25] * 40) == (0.25, 0.25, 0.25)
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)


def test_nans_are_dropped_and_all_nan_or_empty_gives_nan():
    assert bootstrap_ci([1.0, math.nan, 1.0]) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert all(math.isnan(x) for x in bootstrap_ci([math.nan, math.nan]))


def test_confidence_level_widens_the_interval():
    values = np.random.default_rng(4).random(60)
    _, lo90, hi90 = bootstrap_ci(values, confidence=0.9)
    _, lo99, hi99 = bootstrap_ci(values, confidence=0.99)
    assert lo99 <= lo90 and hi99 >= hi90


def test_custom_stat_with_and_without_axis_argument():
    values = [1.0, 2.0, 3.0, 100.0]
    assert bootstrap_ci(values, stat=np.median)[0] == 2.5
    assert bootstrap_ci(values, stat=lambda v: float(np.max(v)))[0] == 100.0


def test_thousand_resamples_of_a_hundred_values_take_milliseconds():
    values = np.random.default_rng(5).random(100)
    start = time.perf_counter()
    bootstrap_ci(values)
    paired_bootstrap_diff(values, values[::-1])
    assert time.perf_counter() - start < 0.1


def test_paired_diff_detects_a_consistent_improvement_that_unpaired_cis_would_overlap():
    rng = np.random.default_rng(6)
    base = rng.random(60)  # large between-question spread
    better = base + 0.05  # same questions, uniformly a bit better
    diff, low, high = paired_bootstrap_diff(better, base)
    assert diff == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    _, _, hi_base = bootstrap_ci(base)
    _, lo_better, _ = bootstrap_ci(better)
    assert lo_better < hi_base  # the two unpaired intervals overlap


def test_paired_diff_drops_pairs_with_a_nan_and_rejects_unequal_lengths():
    diff, low, high = paired_bootstrap_diff([1.0, math.nan, 0.0], [0.0, 0.0, math.nan])
    assert (diff, low, high) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in paired_bootstrap_diff([math.nan], [1.0]))
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0, 2.0], [1.0])


def test_summarize_reads_top_level_or_scores_and_counts_non_nan():
    rows = [
        {"token_f1": 1.0, "scores": {"citation_precision": math.nan}},
        {"token_f1": 0.0, "scores": {"citation_precision": 1.0}},
        {"scores": {"token_f1": 0.5, "citation_precision": None}},
    ]
    out = summarize(rows, ["token_f1", "citation_precision", "missing"])
    assert out["token_f1"]["mean"] == pytest.approx(0.5) and out["token_f1"]["n"] == 3
    assert out["token_f1"]["low"] <= 0.5 <= out["token_f1"]["high"]
    assert out["citation_precision"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 1}
    assert out["missing"]["n"] == 0 and math.isnan(out["missing"]["mean"])
