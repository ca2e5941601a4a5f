"""Rates with intervals: ties counted half, and a bootstrap that resamples whole prompts."""

import numpy as np
import pytest

from train.intervals import grouped_mean_ci95, mean_ci95, ties_half
from train.seed_data import RatedPrompt
from train.self_reward import agreement


def test_ties_count_half():
    result = ties_half([1.0, -2.0, 0.0, 0.0])
    assert result["pair_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert result["pair_ties"] == 0.5 and result["pairs"] == 4


RATED = [RatedPrompt("p1", (("a", 5), ("b", 3), ("c", 1))), RatedPrompt("p2", (("d", 4), ("e", 4), ("f", 0)))]


@pytest.mark.parametrize("scores, accuracy, tie_rate", [
    ([[5, 3, 1], [4, 2, 0]], 1.0, 0.0),  # the human order (p2's equal pair is not counted)
    ([[1, 3, 5], [0, 2, 4]], 0.0, 0.0),  # the reverse
    ([[3, 3, 3], [3, 3, 3]], 0.5, 1.0),  # always "3": uninformative, not wrong
    ([[None, 3, 1], [4, None, 0]], (0.5 + 0.5 + 1 + 1 + 0.5) / 5, 3 / 5),  # no score counts half
])
def test_judge_agreement_counts_ties_and_missing_scores_half(scores, accuracy, tie_rate):
    result = agreement(RATED, scores)
    assert result["human_pairs"] == 5 and result["prompts"] == 2
    assert result["pairwise_accuracy"] == pytest.approx(accuracy)
    assert result["tie_rate"] == pytest.approx(tie_rate)


def test_grouped_bootstrap_resamples_whole_groups():
    """Groups of one: the ordinary bootstrap's interval.  Outcomes that agree within each group: wider
    than treating them as independent, as wide as one outcome per group."""
    rng = np.random.default_rng(1)
    flat = rng.integers(0, 2, 60).astype(float).tolist()
    grouped, plain = grouped_mean_ci95([[x] for x in flat]), mean_ci95(flat)
    assert grouped == pytest.approx(plain, abs=0.03)
    clustered = [[x] * 10 for x in flat[:20]]
    wide = grouped_mean_ci95(clustered)
    narrow = mean_ci95([x for g in clustered for x in g])
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    assert wide == pytest.approx(grouped_mean_ci95([[x] for x in flat[:20]]), abs=1e-9)
