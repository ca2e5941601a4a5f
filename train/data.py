"""Training data: JSONL readers that check every row, the HH-RLHF dialogue split, and the prompt
template every trainer (and the reward potential) uses.

Every prompt is put in steer's one instruction template (`steer.template`) here, once.
Bad rows are reported as `file:line: field ...`, before any trainer sees them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from steer.jsonl import DataError, read_jsonl
from steer.template import TEMPLATE, format_prompt  # noqa: F401 - re-exported for trainers

log = logging.getLogger(__name__)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def render_messages(messages: list[dict[str, str]]) -> tuple[str, str]:
    """A chat (`messages` with roles) as (instruction, response): earlier turns become the instruction's
    context, the final assistant turn is the response."""
    *history, last = messages
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in history]
    instruction = history[-1]["content"] if len(history) == 1 else "\n".join(lines)
    return instruction, last["content"]


def _text(path: Path, number: int, row: dict, field: str) -> str:
    if field not in row:
        raise DataError(f"{path}:{number}: missing field {field!r} (the row has {', '.join(map(repr, row)) or 'none'})")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{number}: field {field!r} is empty")
    return value


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """An HH-RLHF pair of whole dialogues as (prompt, chosen, rejected).

    The two dialogues share every turn but the last assistant reply, so the prompt is the common text
    up to and including the last "\\n\\nAssistant:"; the responses are what follows it.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(ASSISTANT)]):
        # Rare rows differ earlier: fall back to the longest common prefix ending at an assistant turn.
        common = 0
        while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
            common += 1
        cut = chosen.rfind(ASSISTANT, 0, common - len(ASSISTANT) + 1)
        if cut < 0:
            raise ValueError("the two dialogues share no prompt ending with an assistant turn")
    end = cut + len(ASSISTANT)
    return chosen[:end].strip(), chosen[end:].strip(), rejected[end:].strip()


def hh_instruction(dialogue: str) -> str:
    """An HH dialogue prompt ("Human: ... Assistant:") as the instruction of the template."""
    text = dialogue.strip()
    if text.endswith(ASSISTANT.strip()):
        text = text[: -len(ASSISTANT.strip())].rstrip()
    turns = text.split(HUMAN.strip())
    if len(turns) == 2 and not turns[0].strip():  # one human turn: the instruction is that turn
        return turns[1].strip()
    return text


@dataclass(frozen=True)
class Pair:
    """One preference pair, its prompt already in the template."""

    prompt: str
    chosen: str
    rejected: str
    source: str  # "file:line", for messages and per-pair outputs

    def as_row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Preference pairs from JSONL: TRL's `prompt`/`chosen`/`rejected`, or HH-RLHF whole dialogues
    (`chosen`/`rejected` only), which are split at the last assistant turn."""
    path = Path(path)
    pairs: list[Pair] = []
    empty: list[int] = []
    for number, row in read_jsonl(path):
        chosen, rejected = _text(path, number, row, "chosen"), _text(path, number, row, "rejected")
        if "prompt" in row:
            instruction = _text(path, number, row, "prompt")
        elif chosen.lstrip().startswith(HUMAN.strip()):
            try:
                instruction, chosen, rejected = split_hh(chosen, rejected)
            except ValueError as e:
                raise DataError(f"{path}:{number}: fields 'chosen'/'rejected': {e}") from None
            instruction = hh_instruction(instruction)
            if not chosen or not rejected:  # a handful of HH rows end in an empty reply: nothing to compare
                empty.append(number)
                continue
        else:
            raise DataError(f"{path}:{number}: missing field 'prompt' (and 'chosen' is not an HH dialogue)")
        pairs.append(Pair(format_prompt(instruction), chosen.strip(), rejected.strip(), f"{path.name}:{number}"))
        if limit is not None and len(pairs) >= limit:
            break
    if empty:
        log.warning("%s: skipped %d dialogue pair(s) whose final reply is empty (lines %s)",
                    path, len(empty), ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else ""))
    return pairs


def load_prompts(path: str | Path) -> list[str]:
    """The distinct prompts (in the template, in file order) of a preference-pair file or of a file of
    `prompt` rows: what a policy is asked when one samples its responses."""
    path = Path(path)
    first = next(read_jsonl(path))[1]
    if "chosen" in first:
        prompts = [pair.prompt for pair in load_pairs(path)]
    else:
        prompts = [format_prompt(_text(path, number, row, "prompt")) for number, row in read_jsonl(path)]
    return list(dict.fromkeys(prompts))


@dataclass(frozen=True)
class ResponseSet:
    """Several unlabelled responses to one prompt (its prompt already in the template): a sample of a
    policy's outputs, the shifted distribution MetaRM keeps a reward model able to tell apart."""

    prompt: str
    responses: tuple[str, ...]
    source: str


def load_response_sets(path: str | Path, limit: int | None = None) -> list[ResponseSet]:
    """Rows `{"prompt": ..., "responses": [at least two strings]}` from JSONL."""
    path = Path(path)
    sets: list[ResponseSet] = []
    for number, row in read_jsonl(path):
        prompt = _text(path, number, row, "prompt")
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{path}:{number}: field 'responses' must be a list of at least two strings")
        for k, response in enumerate(responses):
            if not isinstance(response, str) or not response.strip():
                raise DataError(f"{path}:{number}: field 'responses'[{k}] must be a non-empty string")
        sets.append(ResponseSet(format_prompt(prompt), tuple(r.strip() for r in responses), f"{path.name}:{number}"))
        if limit is not None and len(sets) >= limit:
            break
    if not sets:
        raise DataError(f"{path}: no response sets")
    return sets


@dataclass(frozen=True)
class Example:
    """One supervised example: a templated prompt and the completion the model should learn."""

    prompt: str
    completion: str
    source: str
    group: str | None = None  # rows of one group stay on one side of the train / eval split

    def as_row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Instruction data from JSONL: `prompt`/`completion`, chat `messages`, or self-instruct seed tasks
    (`instruction`, `instances[{input, output}]`)."""
    path = Path(path)
    examples: list[Example] = []
    for number, row in read_jsonl(path):
        source = f"{path.name}:{number}"
        if "messages" in row:
            messages = row["messages"]
            if (not isinstance(messages, list) or len(messages) < 2
                    or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                               for m in messages)):
                raise DataError(f"{path}:{number}: field 'messages' must be a list of at least two "
                                "{{role, content}} objects")
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{path}:{number}: field 'messages' must end with an assistant turn")
            instruction, completion = render_messages(messages)
        elif "instruction" in row and "instances" in row:
            instance = (row["instances"] or [{}])[0]
            instruction = _text(path, number, row, "instruction")
            if instance.get("input"):
                instruction = f"{instruction}\n\n{instance['input']}"
            completion = _text(path, number, instance, "output")
        else:
            instruction = _text(path, number, row, "prompt")
            completion = _text(path, number, row, "completion")
        examples.append(Example(format_prompt(instruction), completion.strip(), source))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def held_out(rows: list, fraction: float, seed: int,
             group: Callable[[Any], Hashable | None] | None = None) -> tuple[list, list]:
    """A seeded (train, eval) split; the eval part has at least one row when there are two or more.

    With `group`, rows with the same key land on the same side (whole groups are drawn for eval until
    they hold `fraction` of the rows), so that evaluation never sees a near-copy of a training row:
    another pair from the same article, another chunk of the same question.  A key of None is a group
    of its own."""
    if not 0 <= fraction < 1:
        raise DataError(f"the held-out fraction must be in [0, 1), got {fraction}")
    keys = [None if group is None else group(row) for row in rows]
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(("row", i) if key is None else ("group", key), []).append(i)
    groups = list(members.values())
    random.Random(seed).shuffle(groups)
    n_eval = max(1, round(fraction * len(rows))) if fraction > 0 and len(groups) > 1 else 0
    evaluation: list[int] = []
    for g in groups[:-1]:  # the last group always trains
        if len(evaluation) >= n_eval:
            break
        evaluation.extend(g)
    chosen = set(evaluation)
    return [rows[i] for g in groups for i in g if i not in chosen], [rows[i] for i in evaluation]


def split_by_prompt(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A (train, eval) split of preference pairs decided by each prompt alone (a seeded hash), so that
    trainers given the same file, seed and fraction hold out the same prompts whatever pairs each
    leaves out for length: a reward model and a DPO policy are then compared on the same held-out
    pairs, and no prompt is on both sides.  Tiny data where the hash holds out nothing (or
    everything) falls back on a seeded draw of whole prompts."""
    if not 0 <= fraction < 1:
        raise DataError(f"the held-out fraction must be in [0, 1), got {fraction}")
    threshold = fraction * 2**64

    def held(prompt: str) -> bool:
        digest = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < threshold

    sides = [held(p.prompt) for p in pairs]
    evaluation = [p for p, side in zip(pairs, sides) if side]
    train = [p for p, side in zip(pairs, sides) if not side]
    if fraction > 0 and (not evaluation or not train):
        return held_out(pairs, fraction, seed, group=lambda p: p.prompt)
    return train, evaluation


def keep_ends(pairs: list[Pair], tokenizer, max_length: int) -> tuple[list[Pair], int, int]:
    """Pairs made to fit `max_length` tokens the way a reward head reads them: a long prompt loses its
    start (the head pools the response's last token and EOS, so the end must stay), and a pair whose
    longer response cannot fit even with no prompt is left out.  Returns (pairs, prompts cut, left out).

    Dropping every pair that does not fit whole would leave out a quarter of HH-RLHF's harmless pairs
    at 256 tokens, and the longest conversations most of all."""
    kept, cut, dropped = [], 0, 0
    for pair in pairs:
        prompt = tokenizer(pair.prompt, add_special_tokens=True)["input_ids"]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in (pair.chosen, pair.rejected))
        room = max_length - longest - 3  # the EOS the trainer appends, and 2 for retokenizing a cut prompt
        head = 1 if prompt and prompt[0] == tokenizer.bos_token_id else 0
        if room < head + 8:  # no room for any context: the pair would teach the response alone
            dropped += 1
            continue
        if len(prompt) > room:
            cut += 1
            pair = replace(pair, prompt=tokenizer.decode(prompt[len(prompt) - room + head:]))
        kept.append(pair)
    if not kept:
        raise DataError(f"{pairs[0].source}: no pair's responses fit --max-length {max_length}; raise it")
    return kept, cut, dropped


def fit_length(rows: list, tokenizer, max_length: int, fields: tuple[str, ...],
               cut: bool = True) -> tuple[list, int]:
    """Rows that fit `max_length` tokens, and how many rows are too long as a whole.

    A row whose prompt alone fills `max_length` teaches nothing: it is left out and reported with its
    file and line; if no row is left, that is an error.  Longer rows are counted: trainers that `cut`
    responses keep them, others (reward models, which read the score at the last token) leave them out.
    """
    kept, skipped, truncated = [], [], 0
    for row in rows:
        prompt_len = len(tokenizer(row.prompt, add_special_tokens=True)["input_ids"])
        if prompt_len >= max_length:
            skipped.append((row, prompt_len))
            continue
        longest = max(len(tokenizer(getattr(row, f), add_special_tokens=False)["input_ids"]) for f in fields)
        too_long = prompt_len + longest + 1 > max_length
        truncated += too_long
        if cut or not too_long:
            kept.append(row)
    message = ""
    if skipped:
        row, n = skipped[0]
        message = (f"{row.source}: field 'prompt' is {n} tokens, which leaves no room for the response within "
                   f"--max-length {max_length}")
    if not kept:
        raise DataError(f"{message or rows[0].source + ': every row is longer than --max-length ' + str(max_length)}"
                        "; no row fits: raise --max-length or shorten the rows")
    if skipped:
        log.warning("%s; left out %d row(s) like it (%s)", message, len(skipped),
                    ", ".join(r.source for r, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return kept, truncated
