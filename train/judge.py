"""LLM-as-a-Judge (Self-Rewarding Language Models, Yuan et al. 2024, arXiv 2401.10020): robust
score parsing, averaging over repeated judgments, EFT targets and preference pairs.

The judge prompt (the paper's additive 5-point prompt, `steer.template.JUDGE_PROMPT`) is put in
steer's instruction template like every other prompt, so a model fine-tuned on EFT data (instruction =
judge prompt, response = rationale ending in "Score: N") judges in the format it was taught.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from steer.template import JUDGE_PROMPT, judge_instruction  # noqa: F401 - the prompt lives with the templates

CRITERIA = ("relevant", "substantial", "useful", "assistant-like and well organised", "expert and insightful")
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([0-5](?:\.\d+)?)(?:\s*(?:/|out of)\s*5)?", re.IGNORECASE)


def parse_score(judgment: str) -> float | None:
    """The last "Score: N" (0-5, "N/5" and "N out of 5" accepted) in a judgment, or None.

    The last one counts: a rationale may quote intermediate tallies before concluding.
    """
    found = _SCORE.findall(judgment)
    if not found:
        return None
    value = float(found[-1])
    return value if 0 <= value <= 5 else None


def rationale(points: int) -> str:
    """An EFT training target for a response worth `points`: the criteria it meets, then the score.

    The seed data has human quality scores but no written rationales, so the rationale names the
    additive criteria the score implies (the paper's EFT targets are model-written rationales filtered
    to agree with the human ranking).  It is kept short, so that a small judge reaches its score
    within a few dozen tokens."""
    met = ", ".join(CRITERIA[:points]) if points else "none"
    return f"Criteria met: {met}.\nScore: {points}"


def points_from_quality(quality: float) -> int:
    """A human quality score in [0, 1] as additive points 0..5."""
    return max(0, min(5, round(quality * 5)))


@dataclass
class Verdict:
    """Repeated judgments of one response: their parsed scores and the mean of the parseable ones."""

    judgments: list[str]
    scores: list[float | None]

    @property
    def score(self) -> float | None:
        parsed = [s for s in self.scores if s is not None]
        return sum(parsed) / len(parsed) if parsed else None

    @property
    def unparseable(self) -> int:
        return sum(s is None for s in self.scores)


def verdict(judgments: list[str]) -> Verdict:
    return Verdict(list(judgments), [parse_score(j) for j in judgments])


def preference_pair(candidates: list[str], scores: list[float | None]) -> tuple[str, str] | None:
    """(chosen, rejected) = the highest- and lowest-scored candidates; None when the best and worst
    tie or fewer than two candidates have a score."""
    scored = [(s, c) for c, s in zip(candidates, scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda x: x[0])
    worst = min(scored, key=lambda x: x[0])
    if best[0] == worst[0]:
        return None
    return best[1], worst[1]
