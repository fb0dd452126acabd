"""Paired statistics of two models scored on the same cases.

For one metric and one class (or the mean over classes), each case gives a pair of scores, one per
model; the comparison works on the per-case differences ``a - b``:

* the mean difference with a percentile bootstrap 95% interval (``scipy.stats.bootstrap``, seeded,
  10,000 resamples of the cases);
* the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``; zero differences are dropped, as
  Wilcoxon defined it; when every difference is zero there is nothing to rank and ``p`` is 1);
* wins, ties and losses of ``a``: a case is a tie when the two scores differ by less than
  ``tie_margin``.

A difference counts as real (verdict ``"better"`` or ``"worse"``) only when the test rejects at
``alpha`` and the interval excludes zero; otherwise the two are ``"not distinguishable"``. Cases where
either score is missing (NaN: the class is in neither prediction nor reference) are left out of the pair.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05
TIE_MARGIN = 1e-3  # 0.1 Dice or NSD points


@dataclass(frozen=True)
class PairedResult:
    """The paired comparison of model ``a`` against model ``b`` on ``n`` cases (differences ``a - b``)."""

    n: int
    mean_a: float | None
    mean_b: float | None
    mean_difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    wins: int
    ties: int
    losses: int
    verdict: str  # "better", "worse" or "not distinguishable" (a against b)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
    alpha: float = ALPHA,
    tie_margin: float = TIE_MARGIN,
) -> PairedResult:
    """Compare per-case scores ``a`` and ``b`` (same cases, same order); see the module docstring."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two equal-length lists, got shapes {x.shape} and {y.shape}")
    if resamples < 1 or not 0 < confidence < 1 or not 0 < alpha < 1 or tie_margin < 0:
        raise ValueError("resamples must be >= 1, confidence and alpha in (0, 1), tie_margin >= 0")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n == 0:
        return PairedResult(0, None, None, None, None, None, None, 0, 0, 0, "not distinguishable")
    d = x - y
    wins, losses = int(np.sum(d >= tie_margin)), int(np.sum(d <= -tie_margin))
    ties = n - wins - losses
    mean = float(d.mean())
    if n < 2:
        low = high = None  # one case: no interval, no test
        p = 1.0
    elif np.all(d == d[0]):
        low = high = float(d[0])  # every resample has the same mean
        p = 1.0 if d[0] == 0 else _wilcoxon(stats, d)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # degenerate resamples of very few cases
            result = stats.bootstrap(
                (d,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                vectorized=True, rng=np.random.default_rng(seed),
            )  # fmt: skip
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        p = _wilcoxon(stats, d)
    significant = p < alpha and low is not None and high is not None and (low > 0 or high < 0)
    verdict = ("better" if mean > 0 else "worse") if significant else "not distinguishable"
    return PairedResult(
        n, float(x.mean()), float(y.mean()), mean, low, high, p, wins, ties, losses, verdict
    )  # fmt: skip


def _wilcoxon(stats: Any, d: np.ndarray) -> float:
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few cases: scipy notes the exact distribution's limits
        p = float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else p
