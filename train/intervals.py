"""Confidence intervals for the rates the evaluations report (win rates, judge accuracy).

A rate over 16 or 80 items moves by several points from sampling alone; reporting the interval beside
it says whether a difference is worth reading.  The bootstrap is scipy's own."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_ci95(outcomes: Sequence[float], seed: int = 0) -> list[float] | None:
    """A 95% percentile-bootstrap interval for the mean of per-item outcomes (1 win, 0.5 tie, 0 loss;
    or 1 / 0 for correct / wrong), or None for fewer than two items."""
    from scipy.stats import bootstrap

    values = np.asarray(outcomes, dtype=float)
    if len(values) < 2:
        return None
    if np.all(values == values[0]):  # no spread to resample
        return [float(values[0]), float(values[0])]
    result = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=4000, method="percentile",
                       rng=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]
