"""Paired statistics on constructed data where the answer is known (mednext.pipeline.stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mednext.pipeline.stats import paired_comparison


def _scores(n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.6, 0.9, n)


def test_identical_models_are_not_distinguishable() -> None:
    a = _scores()
    result = paired_comparison(a, a.copy())
    assert result.n == 20 and result.p_value == 1.0
    assert result.mean_difference == 0.0
    assert result.ci_low <= 0.0 <= result.ci_high
    assert (result.wins, result.ties, result.losses) == (0, 20, 0)
    assert result.verdict == "not distinguishable"


def test_a_model_better_on_every_case_is_detected() -> None:
    b = _scores()
    a = b + np.random.default_rng(1).uniform(0.01, 0.05, b.size)
    result = paired_comparison(a, b)
    assert result.p_value < 0.05 and result.ci_low > 0
    assert (result.wins, result.ties, result.losses) == (20, 0, 0)
    assert result.verdict == "better"
    # the same pair the other way round
    assert paired_comparison(b, a).verdict == "worse"
    # Wilcoxon's p is scipy's, the mean difference and its interval are those of the differences
    assert result.p_value == pytest.approx(scipy_stats.wilcoxon(a - b).pvalue)
    assert result.mean_difference == pytest.approx(float(np.mean(a - b)))
    assert np.min(a - b) <= result.ci_low < result.mean_difference < result.ci_high <= np.max(a - b)


def test_noise_around_zero_is_not_called_a_difference() -> None:
    b = _scores(30)
    noise = np.random.default_rng(2).normal(0, 0.02, b.size)
    result = paired_comparison(b + noise - noise.mean(), b)
    assert result.verdict == "not distinguishable"
    assert result.ci_low < 0 < result.ci_high and result.p_value > 0.05


def test_the_interval_is_seeded_and_repeatable() -> None:
    b = _scores()
    a = b + np.random.default_rng(3).normal(0.01, 0.02, b.size)
    assert paired_comparison(a, b) == paired_comparison(a, b)
    assert paired_comparison(a, b, seed=1).ci_low != paired_comparison(a, b).ci_low


def test_missing_scores_drop_the_pair_and_small_samples_stay_undecided() -> None:
    a = [0.9, math.nan, 0.8, 0.7]
    b = [0.5, 0.6, math.nan, 0.6]
    result = paired_comparison(a, b)
    assert result.n == 2 and result.mean_a == pytest.approx(0.8)
    # two cases, both won: the smallest two-sided Wilcoxon p is 0.5, so no verdict of "better"
    assert result.p_value == pytest.approx(0.5) and result.verdict == "not distinguishable"
    one = paired_comparison([0.9], [0.1])
    assert one.n == 1 and one.ci_low is None and one.p_value == 1.0 and one.verdict == "not distinguishable"
    none = paired_comparison([math.nan], [0.1])
    assert none.n == 0 and none.mean_difference is None


def test_ties_within_the_margin() -> None:
    result = paired_comparison([0.5, 0.5004, 0.6], [0.5, 0.5, 0.5])
    assert (result.wins, result.ties, result.losses) == (1, 2, 0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="resamples"):
        paired_comparison([0.1], [0.2], resamples=0)
