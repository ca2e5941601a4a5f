"""Each resampling scheme gives every particle N * w_i offspring on average."""

import numpy as np
import pytest

from steer.errors import SteerError
from steer.resampling import SCHEMES, resample, without_replacement

WEIGHTS = np.array([0.5, 0.25, 0.125, 0.0625, 0.0375, 0.025, 0.0, 0.0])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_offspring_counts_are_unbiased(scheme):
    rng = np.random.default_rng(0)
    n, reps = 8, 20000
    counts = np.array([np.bincount(resample(WEIGHTS, n, scheme, rng), minlength=len(WEIGHTS)) for _ in range(reps)])
    assert (counts.sum(axis=1) == n).all()
    mean, se = counts.mean(0), counts.std(0, ddof=1) / np.sqrt(reps)
    expected = n * WEIGHTS
    assert np.all(np.abs(mean - expected) <= 4 * se + 1e-9), (scheme, mean, expected)
    assert counts[:, WEIGHTS == 0].sum() == 0  # zero weight, no offspring


def test_systematic_counts_are_floor_or_ceil_of_expectation():
    rng = np.random.default_rng(1)
    for _ in range(500):
        counts = np.bincount(resample(WEIGHTS, 8, "systematic", rng), minlength=len(WEIGHTS))
        assert np.all(np.abs(counts - 8 * WEIGHTS) < 1)


def test_residual_keeps_the_integer_part():
    rng = np.random.default_rng(1)
    for _ in range(500):
        counts = np.bincount(resample(WEIGHTS, 8, "residual", rng), minlength=len(WEIGHTS))
        assert np.all(counts >= np.floor(8 * WEIGHTS))


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(SteerError, match="unknown resampling scheme"):
        resample(WEIGHTS, 4, "bogus", np.random.default_rng())


def test_without_replacement_selection_probabilities():
    """Fearnhead-Clifford: particle i is kept with probability min(1, c w_i), never twice."""
    rng = np.random.default_rng(2)
    w = np.array([0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    n, reps = 3, 20000
    hits = np.zeros(len(w))
    for _ in range(reps):
        kept, drawn, log_c = without_replacement(np.log(w), n, rng)
        chosen = np.concatenate([kept, drawn])
        assert len(chosen) == n and len(set(chosen.tolist())) == n
        hits[chosen] += 1
    c = np.exp(log_c)
    assert np.isclose(np.minimum(c * w, 1).sum(), n)
    expected = np.minimum(c * w, 1)
    assert np.all(np.abs(hits / reps - expected) < 4 * np.sqrt(expected * (1 - expected) / reps) + 1e-9)
