"""Self-Rewarding Language Models (Yuan et al. 2024, arXiv 2401.10020), end to end.

M1 = SFT(M0, IFT + EFT seed data); then for t = 1, 2, ...: M_t writes new prompts (self-instruction),
samples N candidate responses per prompt, judges each candidate itself with the additive 5-point
prompt (several judgments averaged), and M_{t+1} = DPO(M_t, pairs of highest- vs lowest-scored
candidates, ties dropped).

Each model M_t is measured as the paper does: its judge's agreement with held-out human scores
(pairwise accuracy, exact match) and its head-to-head win rate against M_{t-1} on held-out questions
(all 80 MT-Bench first turns by default). The head-to-head judge is given (`config.judge`): a reward
model from `steer train reward`, or a causal LM that is neither of the two models compared, so that
no model grades its own answers; without one, win rates are not measured. Rates come with 95%
bootstrap intervals.

Every stage writes its files as it finishes (prompts, candidates, judgments, pairs, model, metrics),
so a rerun with `resume=True` continues where the last one stopped.
"""

from __future__ import annotations

import gc
import json
import logging
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from steer.errors import SteerError
from steer.files import atomic_write_text, save_figure
from steer.jsonl import write_jsonl
from steer.potentials import ScoringModel

from .common import TrainOptions, model_dir, write_metrics
from .data import format_prompt
from .generation import GenerationStats, Generator
from .intervals import grouped_mean_ci95, mean_ci95
from .judge import judge_instruction, preference_pair, verdict
from .seed_data import RatedPrompt, load_seed_data
from .self_instruct import clean_task, deduplicate, few_shot_prompt

log = logging.getLogger(__name__)


@dataclass
class SelfRewardConfig:
    iterations: int = 3  # models M1..M_iterations
    prompts_per_iter: int = 16
    candidates: int = 4
    judgments: int = 3
    temperature: float = 0.7  # the paper's sampling for candidates and judgments
    top_p: float = 0.9
    max_new_tokens: int = 96
    judge_tokens: int = 48  # EFT rationales are short: the score comes within a few dozen tokens
    few_shot: int = 6
    held_out: int = 16  # prompts with human scores, for judge agreement
    questions: int = 80  # held-out questions, for win rates (MT-Bench has 80 first turns)
    judge: str | None = None  # head-to-head judge: a reward model or causal LM that is neither model compared
    seed_limit: int | None = None  # training prompts taken from the seed data
    generation_batch: int = 16


class JudgeFailed(SteerError):
    """A model produced no parseable judgment; the loop stops and keeps what it made."""



def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage(path: Path, make) -> list[dict]:
    """The rows of a finished stage file, or make and write them."""
    if path.exists():
        return _read_jsonl(path)
    rows = make()
    write_jsonl(path, rows)
    return rows


def judge(generator: Generator, items: list[tuple[str, str]], config: SelfRewardConfig, seed: int,
          desc: str = "judging") -> list[dict]:
    """Judge every (instruction, response) `config.judgments` times; scores averaged."""
    prompts = [format_prompt(judge_instruction(i, r)) for i, r in items]
    outputs = generator.generate(prompts, n=config.judgments, max_new_tokens=config.judge_tokens,
                                 temperature=config.temperature, top_p=config.top_p, seed=seed, desc=desc)
    rows = []
    for (instruction, response), judgments in zip(items, outputs):
        v = verdict(judgments)
        rows.append({"instruction": instruction, "response": response, "judgments": judgments,
                     "scores": v.scores, "score": v.score})
    return rows


def new_prompts(generator: Generator, tasks: list[str], config: SelfRewardConfig, seed: int) -> list[str]:
    """Self-instruction: up to `prompts_per_iter` new, de-duplicated tasks."""
    rng = random.Random(seed)
    kept: list[str] = []
    for attempt in range(4):  # a few rounds, in case filtering removes many
        need = config.prompts_per_iter - len(kept)
        if need <= 0:
            break
        shots = [few_shot_prompt(tasks, config.few_shot, rng) for _ in range(2 * need)]
        raw = [c[0] for c in generator.generate(shots, n=1, max_new_tokens=48, temperature=1.0, top_p=0.9,
                                                seed=seed + attempt, stop="\n", desc="self-instruction")]
        cleaned = [t for t in (clean_task(r) for r in raw) if t]
        kept += deduplicate(cleaned, tasks + kept)[:need]
    return kept


def aift_pairs(generator: Generator, prompts: list[str], stage: Path, config: SelfRewardConfig,
               seed: int) -> tuple[list[dict], dict[str, Any]]:
    """Candidates, judgments and preference pairs for one iteration (each file written once)."""
    candidates = _stage(stage / "candidates.jsonl", lambda: [
        {"prompt": p, "candidates": c} for p, c in zip(prompts, generator.generate(
            [format_prompt(p) for p in prompts], n=config.candidates, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature, top_p=config.top_p, seed=seed, desc="candidates"))])
    items = [(row["prompt"], c) for row in candidates for c in row["candidates"]]
    judged = _stage(stage / "judgments.jsonl", lambda: judge(generator, items, config, seed + 1))
    unparseable = sum(s is None for row in judged for s in row["scores"])
    total = sum(len(row["scores"]) for row in judged)
    if total and unparseable == total:
        raise JudgeFailed(f"{stage}: none of the {total} judgments had a parseable 'Score: N'; stopping here. "
                          f"Kept: {', '.join(p.name for p in sorted(stage.glob('*.jsonl')))}")
    pairs, ties = [], 0
    for k, row in enumerate(candidates):
        scores = [j["score"] for j in judged[k * config.candidates:(k + 1) * config.candidates]]
        pair = preference_pair(row["candidates"], scores)
        if pair is None:
            ties += 1
            continue
        pairs.append({"prompt": row["prompt"], "chosen": pair[0], "rejected": pair[1]})
    write_jsonl(stage / "pairs.jsonl", pairs)
    stats = {"prompts": len(prompts), "candidates": len(items), "judgments": total, "unparseable": unparseable,
             "pairs": len(pairs), "dropped_ties_or_unscored": ties}
    return pairs, stats


def judge_agreement(generator: Generator, rated: list[RatedPrompt], config: SelfRewardConfig,
                    seed: int) -> dict[str, Any]:
    """The judge against human scores: pairwise accuracy over responses to the same prompt with
    different human scores, and exact match of the rounded score."""
    items = [(r.prompt, response) for r in rated for response, _ in r.responses]
    judged = judge(generator, items, config, seed, desc="judge agreement")
    scores = _per_prompt(rated, [row["score"] for row in judged])
    return {**agreement(rated, scores, seed),
            "unparseable": sum(s is None for row in judged for s in row["scores"]),
            "judgments": sum(len(row["scores"]) for row in judged)}


def _per_prompt(rated: list[RatedPrompt], flat: list) -> list[list]:
    """Scores listed response by response over all prompts, regrouped by prompt."""
    out, k = [], 0
    for r in rated:
        out.append(flat[k:k + len(r.responses)])
        k += len(r.responses)
    return out


def agreement(rated: list[RatedPrompt], scores: list[list[float | None]], seed: int = 0) -> dict[str, Any]:
    """How a judge's scores (None: no score) order each prompt's responses against the human scores.

    Over the pairs of one prompt's responses with different human scores: 1 where the judge orders them
    the same way, 0 the other way, and a half where it scores them the same or could not score one
    (an uninformative judge gets 0.5, not 0).  The interval resamples prompts, since pairs of one
    prompt share its responses."""
    by_prompt: list[list[float]] = []
    ties = exact = scored = 0
    for r, model_scores in zip(rated, scores):
        human = [h for _, h in r.responses]
        for m, h in zip(model_scores, human):
            if m is not None:
                scored += 1
                exact += round(m) == h
        row = []
        for i in range(len(human)):
            for j in range(i + 1, len(human)):
                if human[i] == human[j]:
                    continue
                a, b = model_scores[i], model_scores[j]
                if a is None or b is None or a == b:
                    ties += 1
                    row.append(0.5)
                else:
                    row.append(float((a - b) * (human[i] - human[j]) > 0))
        if row:
            by_prompt.append(row)
    pairs = sum(map(len, by_prompt))
    return {"pairwise_accuracy": sum(map(sum, by_prompt)) / pairs if pairs else None,
            "ci95": grouped_mean_ci95(by_prompt, seed), "human_pairs": pairs, "prompts": len(by_prompt),
            "tie_rate": ties / pairs if pairs else None,
            "exact_match": exact / scored if scored else None, "scored": scored}


def answers(directory: Path, questions: list[str], config: SelfRewardConfig, stats: GenerationStats) -> list[str]:
    generator = Generator(directory, batch_size=config.generation_batch)
    out = [c[0] for c in generator.generate([format_prompt(q) for q in questions], n=1,
                                            max_new_tokens=config.max_new_tokens, temperature=0.0, desc="answers")]
    _add(stats, generator.stats)
    return out


def validate_judge(judge: ScoringModel, rated: list[RatedPrompt], seed: int = 0) -> dict[str, Any]:
    """The head-to-head judge on held-out human-rated responses, scored as the models' own judges are
    (pairwise accuracy, ties half, interval by prompt): a win rate means little from a judge that
    cannot order responses in this domain, so its accuracy is reported beside every win rate."""
    flat = judge.rewards([r.prompt for r in rated for _ in r.responses],
                         [response for r in rated for response, _ in r.responses])
    found = agreement(rated, _per_prompt(rated, [float(x) for x in flat]), seed)
    return {k: v for k, v in found.items() if k not in ("exact_match", "scored")}  # rewards are not 0-5 points


def win_rate(judge: ScoringModel, questions: list[str], new: list[str], old: list[str],
             seed: int = 0) -> dict[str, Any]:
    """Head to head on held-out questions, scored by a judge that is neither model: wins + ties / 2 over
    questions, with a 95% bootstrap interval over questions."""
    n = len(questions)
    scores = judge.rewards([*questions, *questions], [*new, *old])
    outcomes = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores[:n], scores[n:])]
    return {"win_rate": sum(outcomes) / n if n else None, "ci95": mean_ci95(outcomes, seed),
            "wins": outcomes.count(1.0), "losses": outcomes.count(0.0), "ties": outcomes.count(0.5),
            "questions": n}


def _add(total: GenerationStats, part: GenerationStats) -> None:
    total.tokens += part.tokens
    total.seconds += part.seconds
    total.calls += part.calls


def _free(*objects) -> None:
    del objects
    gc.collect()


def self_reward(seed_dir: str | Path, options: TrainOptions, config: SelfRewardConfig | None = None,
                dpo_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the loop into `options.out`; `options` also sets the SFT/DPO runs (LoRA, lengths, steps).

    Returns (and writes to `out/metrics.json`) per-iteration metrics; `out/report.md` holds the table
    and `out/report.png` the plot."""
    from .dpo import train_dpo
    from .sft import train_sft

    config = config or SelfRewardConfig()
    if config.iterations < 1 or config.candidates < 2 or config.judgments < 1 or config.prompts_per_iter < 1:
        raise SteerError("self-reward needs --iterations >= 1, --candidates >= 2, --judgments >= 1 and "
                         "--prompts-per-iter >= 1")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = load_seed_data(seed_dir, held_out=config.held_out, seed=options.seed, limit=config.seed_limit)
    questions = seeds.questions[:config.questions]
    base = model_dir(options.model)
    metrics_path = out / "metrics.json"
    state = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    head_to_head_judge = None
    if config.judge is not None:
        from steer.potentials import load_potential

        head_to_head_judge = load_potential(config.judge)  # a reward model, or a causal LM as judge
        if "head_to_head_judge" not in state:
            state["head_to_head_judge"] = {"judge": config.judge,
                                           **validate_judge(head_to_head_judge, seeds.held_out, options.seed + 11)}
    else:
        log.warning("no --judge: win rates are not measured (a model must not grade its own answers)")
    models = {0: base}
    stats = GenerationStats()
    iterations: dict[str, Any] = state.get("iterations", {})

    def train_stage(name: str, fn, data, start: Path) -> Path:
        """Train stage `name` starting from the model `start` (which DPO also takes as its reference)."""
        stage = out / name
        model = stage / "model"
        if (stage / "metrics.json").exists() and model.is_dir():
            return model
        from .common import last_checkpoint

        opts = replace(options, model=str(start), out=str(stage), resume=last_checkpoint(stage) is not None)
        fn(data, opts)
        return model

    # M1: SFT on IFT + EFT (written out as prompt/completion JSONL, the format SFT reads)
    for name, examples in (("ift", seeds.ift), ("eft", seeds.eft)):
        _stage(out / "m1" / f"{name}.jsonl", lambda examples=examples: [
            {"prompt": e.prompt, "completion": e.completion, "source": e.source} for e in examples])
    models[1] = train_stage("m1", train_sft, seeds.ift + seeds.eft, base)
    for t in range(1, config.iterations + 1):
        stage = out / f"m{t}"
        if t > 1:
            generator = Generator(models[t - 1], batch_size=config.generation_batch, progress=options.progress)
            prompts = [r["prompt"] for r in _stage(stage / "prompts.jsonl", lambda: [
                {"prompt": p} for p in new_prompts(generator, seeds.tasks, config, options.seed + 100 * t)])]
            pairs, aift = aift_pairs(generator, prompts, stage, config, options.seed + 100 * t)
            _add(stats, generator.stats)
            _free(generator)
            if not pairs:
                raise JudgeFailed(f"{stage}: every prompt's candidates tied or went unscored, so there are no "
                                  "preference pairs to train on; stopping here (the files made are kept)")
            pairs_file = stage / "pairs.jsonl"
            # M_t = DPO(M_{t-1}) with M_{t-1} as the reference, as the paper chains them.
            models[t] = train_stage(f"m{t}", lambda data, opts: train_dpo(data, opts, **(dpo_options or {})),
                                    pairs_file, models[t - 1])
            iterations.setdefault(str(t), {})["aift"] = aift
        record = iterations.setdefault(str(t), {})
        if "judge" not in record:
            generator = Generator(models[t], batch_size=config.generation_batch, progress=options.progress)
            record["judge"] = judge_agreement(generator, seeds.held_out, config, options.seed + 7)
            _add(stats, generator.stats)
            _free(generator)
            _save(metrics_path, iterations, config, options, stats, state.get("head_to_head_judge"))
        if "head_to_head" not in record and head_to_head_judge is not None:
            new = answers(models[t], questions, config, stats)
            old = answers(models[t - 1], questions, config, stats)
            record["head_to_head"] = {"against": f"M{t - 1}", "judge": config.judge,
                                      **win_rate(head_to_head_judge, questions, new, old, options.seed + 9)}
            write_jsonl(stage / "head_to_head.jsonl", [{"question": q, f"M{t}": a, f"M{t - 1}": b}
                                                        for q, a, b in zip(questions, new, old)])
        _save(metrics_path, iterations, config, options, stats, state.get("head_to_head_judge"))
    report(out, iterations, state.get("head_to_head_judge"))
    return json.loads(metrics_path.read_text())


def _save(path: Path, iterations: dict, config: SelfRewardConfig, options: TrainOptions,
          stats: GenerationStats, validation: dict | None = None) -> None:
    previous = json.loads(path.read_text()).get("generation", {}) if path.exists() else {}
    tokens = previous.get("tokens", 0) + stats.tokens
    seconds = previous.get("seconds", 0.0) + stats.seconds
    stats.tokens, stats.seconds = 0, 0.0  # counted once
    write_metrics(path.parent, {"trainer": "self_reward", "config": asdict(config), "settings": options.as_dict(),
                                "iterations": iterations, "head_to_head_judge": validation,
                                "generation": {"tokens": tokens, "seconds": seconds,
                                               "tokens_per_second": tokens / seconds if seconds else None}})


def report(out: Path, iterations: dict[str, Any], validation: dict[str, Any] | None = None) -> Path:
    """A markdown table and a plot of the per-iteration measurements; with the head-to-head judge's
    own accuracy on held-out human ratings (`validation`) beside every win rate."""
    header = ("| model | judge pairwise acc., ties half [95% CI by prompt] | judge ties | judge exact match | "
              "unparseable | pairs | win rate vs previous [95% CI] |")
    rows = [header, "|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    def with_ci(value, ci):
        return fmt(value) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    judged_by = f" (judge acc. {fmt(validation.get('pairwise_accuracy'))})" if validation else ""
    ts = sorted(iterations, key=int)
    for t in ts:
        r = iterations[t]
        j, h, a = r.get("judge", {}), r.get("head_to_head", {}), r.get("aift", {})
        rows.append(f"| M{t} | {with_ci(j.get('pairwise_accuracy'), j.get('ci95'))} | {fmt(j.get('tie_rate'))} | "
                    f"{fmt(j.get('exact_match'))} | "
                    f"{j.get('unparseable', '-')}/{j.get('judgments', '-')} | {a.get('pairs', '-')} | "
                    f"{with_ci(h.get('win_rate'), h.get('ci95'))} vs {h.get('against', '-')}"
                    f"{judged_by if h else ''} |")
    note = ""
    if validation:
        note = (f"\n\nThe head-to-head judge ({validation['judge']}) on held-out human-rated responses: pairwise "
                f"accuracy {with_ci(validation.get('pairwise_accuracy'), validation.get('ci95'))}, ties "
                f"{fmt(validation.get('tie_rate'))}; near 0.5 it cannot tell better answers from worse in this "
                "domain, and its win rates say nothing.\n")
    atomic_write_text(out / "report.md", "# Self-rewarding training\n\n" + "\n".join(rows) + "\n" + note)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [int(t) for t in ts]
    for key, sub, label in (("judge", "pairwise_accuracy", "judge pairwise accuracy"),
                            ("head_to_head", "win_rate", "win rate vs previous")):
        ys = [iterations[t].get(key, {}).get(sub) for t in ts]
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, [f"M{t}" for t in x])
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "report.png", dpi=120)
    plt.close(fig)
    return out / "report.md"
