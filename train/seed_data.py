"""Seed data for self-rewarding training: IFT and EFT examples from human-scored responses, held-out
prompts for judge agreement, few-shot tasks for self-instruction, and held-out questions.

From oasst2 (several human-written responses per prompt, each with a quality score in [0, 1]):
- IFT: for each training prompt, its best-scored response;
- EFT: for each training prompt and scored response, the judge prompt as instruction and, as the
  target, the additive criteria met by the human score followed by "Score: N";
- held-out prompts (with at least two scored responses) measure how well a judge agrees with the
  human ranking.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, Example, format_prompt, read_jsonl
from .judge import judge_instruction, points_from_quality, rationale


@dataclass(frozen=True)
class RatedPrompt:
    """A prompt with human-rated responses: (response, points 0..5)."""

    prompt: str
    responses: tuple[tuple[str, int], ...]
    source: str = ""  # "file:line" of the prompt's first row


def _field(path: Path, number: int, row: dict, name: str, kind: type | tuple, optional: bool = False):
    if name not in row:
        raise DataError(f"{path}:{number}: missing field {name!r}")
    value = row[name]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}:{number}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def load_rated(path: str | Path) -> list[RatedPrompt]:
    """oasst2-style rows grouped by prompt; responses without a score are dropped."""
    path = Path(path)
    grouped: dict[str, tuple[str, list, str]] = {}
    for number, row in read_jsonl(path):
        prompt_id = _field(path, number, row, "prompt_id", str)
        prompt = _field(path, number, row, "prompt_text", str)
        response = _field(path, number, row, "response_text", str)
        quality = _field(path, number, row, "quality_score", (int, float), optional=True)
        if quality is not None and not 0 <= quality <= 1:
            raise DataError(f"{path}:{number}: field 'quality_score' must be in [0, 1], got {quality}")
        entry = grouped.setdefault(prompt_id, (prompt, [], f"{path.name}:{number}"))
        if quality is not None and response.strip():
            entry[1].append((response.strip(), points_from_quality(quality)))
    return [RatedPrompt(p, tuple(r), source) for p, r, source in grouped.values() if r]


@dataclass
class SeedData:
    ift: list[Example]
    eft: list[Example]
    held_out: list[RatedPrompt]  # judge agreement
    tasks: list[str]  # few-shot examples for self-instruction
    questions: list[str]  # head-to-head prompts


def load_tasks(path: str | Path) -> list[str]:
    """Instructions from self-instruct seed tasks (`instruction`) or any JSONL with `prompt`."""
    path = Path(path)
    tasks = []
    for number, row in read_jsonl(path):
        text = row.get("instruction", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: missing field 'instruction' (or 'prompt')")
        tasks.append(text.strip())
    return tasks


def load_questions(path: str | Path) -> list[str]:
    """First turns of MT-Bench-style rows (`turns`), or `prompt` fields."""
    path = Path(path)
    questions = []
    for number, row in read_jsonl(path):
        turns = row.get("turns")
        text = turns[0] if isinstance(turns, list) and turns else row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: missing field 'turns' (or 'prompt')")
        questions.append(text.strip())
    return questions


SEED_FILES = {"rated": "oasst2_quality_scored.jsonl.gz", "tasks": "self_instruct_seed.jsonl",
              "questions": "mt_bench_questions.jsonl"}


def load_seed_data(directory: str | Path, *, held_out: int = 40, seed: int = 0, limit: int | None = None,
                   max_chars: int = 1200) -> SeedData:
    """Seed data from a directory holding the three `SEED_FILES` (as `examples/data/` does).

    `max_chars` leaves out very long responses, which a small model's context could not hold with
    the judge prompt around them."""
    directory = Path(directory)
    for name in SEED_FILES.values():
        if not (directory / name).is_file():
            raise DataError(f"{directory}: the seed data needs {name} ({', '.join(SEED_FILES.values())})")
    rated = [RatedPrompt(r.prompt, tuple(x for x in r.responses if len(x[0]) <= max_chars), r.source)
             for r in load_rated(directory / SEED_FILES["rated"]) if len(r.prompt) <= max_chars]
    rated = [r for r in rated if r.responses]
    random.Random(seed).shuffle(rated)
    comparable = [r for r in rated if len({p for _, p in r.responses}) >= 2]
    evaluation = comparable[:held_out]
    chosen = {id(r) for r in evaluation}
    training = [r for r in rated if id(r) not in chosen][:limit]
    ift = [Example(format_prompt(r.prompt), max(r.responses, key=lambda x: x[1])[0], r.source) for r in training]
    eft = [Example(format_prompt(judge_instruction(r.prompt, response)), rationale(points), r.source)
           for r in training for response, points in r.responses]
    return SeedData(ift, eft, evaluation, load_tasks(directory / SEED_FILES["tasks"]),
                    load_questions(directory / SEED_FILES["questions"]))
