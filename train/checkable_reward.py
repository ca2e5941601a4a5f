"""The self-rewarding loop with a checkable reward: iterative DPO on cloze-year questions.

A model that judges its own answers cannot show on a 270M model whether the loop learns: its
judgments are near chance, and a win rate needs another judge.  This variant keeps the loop —
M_t samples several answers per question, a reward ranks them, M_{t+1} = DPO(M_t, highest- vs
lowest-rewarded answer, ties dropped) with M_t as the reference — but the reward is checked against
a known answer: a cloze question cut from a Wikipedia paragraph (a year blanked out), asked after
the paragraph, so answering is reading, not recall.  The metric is the same check on
held-out questions (greedy answers, the first line exactly the year), so the change from M0 to each
M_t carries a paired 95% interval over questions.

Reward: 2 when the answer's first line is exactly the year, 1 when the year appears in the answer,
0 otherwise.  Questions are split by article (`source` = `<article>-<paragraph>`), so no held-out
question shares an article with a training one.

Every stage writes its files as it finishes (`m<t>/candidates.jsonl`, `pairs.jsonl`, the model, the
held-out `answers.jsonl`, `metrics.json`), so a rerun with
`options.resume` continues where the last one stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.corpus import load_documents
from steer.errors import SteerError
from steer.jsonl import write_jsonl

from .common import TrainOptions, last_checkpoint, model_dir, write_metrics
from .data import held_out
from .generation import Generator
from .intervals import mean_ci95
from .judge import preference_pair
from .radit import QA, answer_line, load_qa
from .self_reward import _free, _stage

log = logging.getLogger(__name__)


@dataclass
class CheckableConfig:
    iterations: int = 3  # models M1..M_iterations
    train_questions: int = 240  # questions M_t answers each iteration (the pairs come from them)
    eval_questions: int = 150  # held-out questions, by article
    candidates: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 6  # a year and a newline
    generation_batch: int = 32


def reward(output: str, answer: str) -> int:
    """2: the first line is exactly the answer; 1: the answer appears in the output; 0: neither."""
    if answer_line(output) == answer_line(answer):
        return 2
    return 1 if answer in output else 0


def prompts_for(questions: list[QA], passages: dict[str, str]) -> list[str]:
    """Each question after its source paragraph, as plain text ending in "Answer:".  The default model
    is a base model: in this completion form it answers (greedy exact match 7 of 12 on a sample), in the
    instruction template it rambles (0 of 51 in docs/retrieval.md)."""
    missing = [q.source for q in questions if q.source not in passages]
    if missing:
        raise SteerError(f"{len(missing)} questions name a source paragraph the passages file lacks "
                         f"(first: {missing[0]!r})")
    return [f"{passages[q.source]}\n\nQuestion: {q.question}\nAnswer:" for q in questions]


def split_questions(questions: list[QA], config: CheckableConfig, seed: int) -> tuple[list[QA], list[QA]]:
    """Training and held-out questions, whole articles on one side."""
    fraction = config.eval_questions / max(len(questions), 1)
    train, held = held_out(list(range(len(questions))), min(fraction, 0.5), seed,
                           group=lambda i: (questions[i].source or str(i)).split("-")[0])
    return [questions[i] for i in train][:config.train_questions], [questions[i] for i in held][:config.eval_questions]


def evaluate(directory: Path, questions: list[QA], prompts: list[str], config: CheckableConfig,
             answers_file: Path) -> dict[str, Any]:
    """Greedy answers (written to `answers_file`): the per-question exact match (kept for paired
    comparisons), its rate and interval."""
    generator = Generator(directory, batch_size=config.generation_batch)
    outputs = [c[0] for c in generator.generate(prompts, n=1, max_new_tokens=config.max_new_tokens,
                                                temperature=0.0, desc="held-out answers")]
    write_jsonl(answers_file, [{"question": q.question, "answer": q.answer, "output": o}
                               for q, o in zip(questions, outputs)])
    rewards = [reward(o, q.answer) for o, q in zip(outputs, questions)]
    exact, contains = [float(r == 2) for r in rewards], [float(r >= 1) for r in rewards]
    _free(generator)
    return {"exact_match": float(np.mean(exact)), "exact_match_ci95": mean_ci95(exact),
            "contains": float(np.mean(contains)), "questions": len(questions), "per_question": exact}


def change(after: list[float], before: list[float], seed: int = 0) -> dict[str, Any]:
    """The change of a per-question rate, with a paired 95% bootstrap interval over questions."""
    diffs = [a - b for a, b in zip(after, before)]
    return {"change": float(np.mean(diffs)), "ci95": mean_ci95(diffs, seed)}


def checkable_self_reward(qa: str | Path, passages: str | Path, options: TrainOptions,
                          config: CheckableConfig | None = None,
                          dpo_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the loop into `options.out` (see the module docstring); returns and writes `metrics.json`,
    with `report.md` beside it."""
    from .dpo import train_dpo

    config = config or CheckableConfig()
    if config.iterations < 1 or config.candidates < 2:
        raise SteerError("the checkable loop needs --iterations >= 1 and --candidates >= 2")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {d.id: d.text for d in load_documents(passages)}
    train_q, eval_q = split_questions(load_qa(qa), config, options.seed)
    if not train_q or not eval_q:
        raise SteerError(f"{qa}: the questions must come from at least two articles (ids `<article>-<paragraph>`), "
                         "so that some can be held out whole")
    train_prompts, eval_prompts = prompts_for(train_q, texts), prompts_for(eval_q, texts)
    metrics_path = out / "metrics.json"
    state = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    models: dict[int, Path] = {0: model_dir(options.model)}
    results: dict[str, Any] = state.get("models", {})

    def save() -> None:
        write_metrics(out, {"trainer": "checkable_self_reward", "config": asdict(config),
                            "settings": options.as_dict(), "questions": {"train": len(train_q), "eval": len(eval_q)},
                            "models": results})

    if "0" not in results:
        (out / "m0").mkdir(exist_ok=True)
        results["0"] = evaluate(models[0], eval_q, eval_prompts, config, out / "m0" / "answers.jsonl")
        save()
    for t in range(1, config.iterations + 1):
        stage = out / f"m{t}"
        model = stage / "model"
        record = results.get(str(t), {})
        trained = (stage / "metrics.json").exists() and model.is_dir()

        def sample(t: int = t) -> list[dict]:  # (the model is loaded only when the file is not there yet)
            generator = Generator(models[t - 1], batch_size=config.generation_batch, progress=options.progress)
            outputs = generator.generate(train_prompts, n=config.candidates, max_new_tokens=config.max_new_tokens,
                                         temperature=config.temperature, top_p=config.top_p,
                                         seed=options.seed + 100 * t, desc=f"M{t - 1} candidates")
            _free(generator)
            return [{"question": q.question, "answer": q.answer, "prompt": p, "candidates": c}
                    for q, p, c in zip(train_q, train_prompts, outputs)]

        # (recounted from the candidates on disk when a run stopped between training and evaluation; a
        # trained model's candidates are never sampled again: new ones would not be what it trained on)
        if not trained or ("pairs" not in record and (stage / "candidates.jsonl").exists()):
            rows = _stage(stage / "candidates.jsonl", sample)
            pairs, rewards = [], []
            for row in rows:
                scores = [reward(c, row["answer"]) for c in row["candidates"]]
                rewards += scores
                pair = preference_pair(row["candidates"], scores)
                if pair is not None:
                    pairs.append({"prompt": row["prompt"], "chosen": pair[0], "rejected": pair[1]})
            record["pairs"] = len(pairs)
            record["candidate_reward"] = {"mean": float(np.mean(rewards)),
                                          "exact_share": float(np.mean([r == 2 for r in rewards]))}
        if not trained:
            if not pairs:
                raise SteerError(f"{stage}: every question's candidates got the same reward, so there are no "
                                 "pairs to train on; stopping here (the candidates are kept)")
            write_jsonl(stage / "pairs.jsonl", pairs)
            # M_t = DPO(M_{t-1}) with M_{t-1} as the reference
            train_dpo(stage / "pairs.jsonl", replace(options, model=str(models[t - 1]), out=str(stage),
                                                     resume=last_checkpoint(stage) is not None),
                      **(dpo_options or {}))
        models[t] = model
        if "exact_match" not in record:
            record.update(evaluate(model, eval_q, eval_prompts, config, stage / "answers.jsonl"))
            record["vs_m0"] = change(record["per_question"], results["0"]["per_question"], options.seed)
            record["vs_previous"] = change(record["per_question"], results[str(t - 1)]["per_question"], options.seed)
        results[str(t)] = record
        save()
    report(out, results)
    return json.loads(metrics_path.read_text())


def report(out: Path, results: dict[str, Any]) -> Path:
    """`out/report.md`: exact match per model and its change from M0, with intervals."""

    def interval(ci) -> str:
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"

    lines = ["| model | pairs trained on | previous model's candidates exactly right | held-out exact match [95% CI] | contains year | "
             "change vs M0 [paired 95% CI] |", "|---|---|---|---|---|---|"]
    for t in sorted(results, key=int):
        r = results[t]
        vs = r.get("vs_m0")
        cand = r.get("candidate_reward", {}).get("exact_share")
        cand = "-" if cand is None else f"{cand:.3f}"
        vs = "-" if vs is None else f"{vs['change']:+.3f} {interval(vs['ci95'])}"
        lines.append(f"| M{t} | {r.get('pairs', '-')} | {cand} | {r['exact_match']:.3f} "
                     f"{interval(r['exact_match_ci95'])} | {r['contains']:.3f} | {vs} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
