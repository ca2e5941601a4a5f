"""Resampling schemes: each maps normalised weights to N ancestor indices with E[count_i] = N w_i."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import SteerError


def multinomial(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(len(weights), size=n, p=weights)


def _from_points(weights: np.ndarray, points: np.ndarray) -> np.ndarray:
    cumulative = np.cumsum(weights)
    cumulative[-1] = 1.0  # guard against round-off leaving the last point outside
    return np.searchsorted(cumulative, points, side="right")


def stratified(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return _from_points(weights, (np.arange(n) + rng.random(n)) / n)


def systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return _from_points(weights, (np.arange(n) + rng.random()) / n)


def residual(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Keep floor(N w_i) copies of each particle, draw the rest multinomially from the remainders."""
    expected = n * weights
    counts = np.floor(expected).astype(int)
    left = n - counts.sum()
    if left:
        remainder = expected - counts
        counts += np.bincount(rng.choice(len(weights), size=left, p=remainder / remainder.sum()),
                              minlength=len(weights))
    return np.repeat(np.arange(len(weights)), counts)


SCHEMES: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise SteerError(f"unknown resampling scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def resample(weights: np.ndarray, n: int, scheme: str, rng: np.random.Generator) -> np.ndarray:
    """Ancestor indices (sorted) for `n` offspring of particles with normalised `weights`."""
    check_scheme(scheme)
    return np.sort(SCHEMES[scheme](weights, n, rng))


def without_replacement(log_weights: np.ndarray, n: int, rng: np.random.Generator):
    """Fearnhead-Clifford optimal resampling of `n` out of more particles, as SMC-steer uses it.

    Particles whose weight is large enough (c w_i >= 1) are kept once each, deterministically; the
    remaining slots are filled by systematic resampling among the others, which then all carry the
    same weight 1/c.  Returns (kept indices, drawn indices, log c) for normalised weights w.
    """
    w = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    alive = np.flatnonzero(w > 0)
    if len(alive) <= n:
        return alive, np.array([], dtype=int), float("inf")
    order = alive[np.argsort(-w[alive])]
    # Find c with sum_i min(c w_i, 1) = n: try keeping the k largest deterministically.
    suffix = np.cumsum(w[order][::-1])[::-1]  # suffix[k] = sum of weights from the k-th largest on
    for k in range(n):
        c = (n - k) / suffix[k]
        if c * w[order[k]] < 1:  # the k-th largest is not kept deterministically: c is consistent
            break
    kept, rest = order[:k], order[k:]
    drawn = rest[systematic(w[rest] / w[rest].sum(), n - k, rng)]
    return kept, drawn, float(np.log(c))
