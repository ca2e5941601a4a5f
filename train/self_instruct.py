"""Self-instruction: new prompts written by the model from few-shot examples of seed tasks, then
cleaned, filtered and de-duplicated (Self-Instruct, Wang et al. 2022, as used for AIFT prompts)."""

from __future__ import annotations

import random
import re

FEW_SHOT_HEADER = "Here are some tasks a user might ask an AI assistant to do. Each task is on one line.\n\n"
_WORD = re.compile(r"[a-z0-9']+")


def few_shot_prompt(tasks: list[str], k: int, rng: random.Random) -> str:
    """k seed tasks as a numbered list, ending where the model should write task k+1."""
    shots = rng.sample(tasks, min(k, len(tasks)))
    lines = [f"Task {i}: {' '.join(t.split())}" for i, t in enumerate(shots, 1)]
    return FEW_SHOT_HEADER + "\n".join(lines) + f"\nTask {len(shots) + 1}:"


def clean_task(text: str) -> str | None:
    """The first line of a generated task, or None if it is not a usable instruction."""
    line = text.strip().split("\n")[0].strip()
    line = re.sub(r"\s*Task \d+:.*$", "", line).strip()  # the model ran on into the next task
    words = _WORD.findall(line.lower())
    if not 3 <= len(words) <= 60 or not re.search(r"[A-Za-z]", line):
        return None
    return line


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def similar(a: str, b: str, threshold: float) -> bool:
    """Word-set Jaccard similarity at or above `threshold`."""
    x, y = _words(a), _words(b)
    return bool(x or y) and len(x & y) / len(x | y) >= threshold


def deduplicate(candidates: list[str], existing: list[str], threshold: float = 0.7) -> list[str]:
    """Candidates in order, dropping any too similar to an existing task or to one already kept."""
    kept: list[str] = []
    for c in candidates:
        if not any(similar(c, other, threshold) for other in [*existing, *kept]):
            kept.append(c)
    return kept
