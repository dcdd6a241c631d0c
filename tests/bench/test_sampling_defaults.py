"""bench/sampling_defaults.py's measures: what counts as a loop, and the paired bootstrap."""

from __future__ import annotations

from bench.sampling_defaults import loops, paired_bootstrap


def test_a_line_or_a_four_gram_three_times_is_a_loop():
    assert loops("Apply to the municipality.\nApply to the municipality.\nApply to the municipality.")
    assert loops("you need a permit, you need a permit, you need a permit")
    assert not loops("you need a permit [1]. The permit takes ten weeks; a permit costs a fee.")
    assert not loops("Apply.\nApply.")  # twice is not a loop


def test_paired_bootstrap_brackets_the_mean():
    mean, lo, hi = paired_bootstrap([0.1, -0.05, 0.2, 0.0, 0.15])
    assert lo <= mean <= hi and round(mean, 6) == 0.08
    assert paired_bootstrap([0.0] * 4) == (0.0, 0.0, 0.0)
