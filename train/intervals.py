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


def ties_half(margins: Sequence[float]) -> dict:
    """Pairwise accuracy of preference margins (score of the chosen minus score of the rejected), a tie
    counting half, with its 95% interval and the share of ties: an uninformative scorer (all ties)
    gets 0.5, not 0."""
    outcomes = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    return {"pair_accuracy": sum(outcomes) / len(outcomes), "pair_accuracy_ci95": mean_ci95(outcomes),
            "pair_ties": sum(m == 0 for m in margins) / len(margins), "pairs": len(outcomes)}


def grouped_mean_ci95(groups: Sequence[Sequence[float]], seed: int = 0, resamples: int = 4000) -> list[float] | None:
    """A 95% percentile-bootstrap interval for the mean of outcomes that come in groups (the pairs of
    one prompt): whole groups are resampled, so outcomes that share a prompt are not counted as
    independent.  None for fewer than two groups."""
    groups = [list(g) for g in groups if len(g)]
    if len(groups) < 2:
        return None
    sums = np.array([sum(g) for g in groups], dtype=float)
    counts = np.array([len(g) for g in groups], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(groups), size=(resamples, len(groups)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
