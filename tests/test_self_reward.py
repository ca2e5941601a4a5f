"""Self-rewarding training on tiny models: the judge prompt and score parsing, pair selection,
self-instruction filtering, seed data, and the loop's bookkeeping, failure and resume."""

import gzip
import json

import numpy as np
import pytest

from steer.potentials import load_potential
from train.common import TrainOptions
from train.data import DataError
from train.judge import (
    judge_instruction,
    parse_score,
    preference_pair,
    rationale,
    verdict,
)
from train.seed_data import load_seed_data
from train.self_instruct import clean_task, deduplicate, few_shot_prompt
from train.self_reward import JudgeFailed, SelfRewardConfig, self_reward

pytestmark = pytest.mark.slow  # training iterations: seconds each, so not in the fast subset


def test_judge_prompt_holds_the_question_the_response_and_the_five_criteria():
    prompt = judge_instruction("  What is 2+2? ", "It is 4.")
    assert "User: What is 2+2?\n<response>It is 4.</response>" in prompt
    assert prompt.count("point") >= 5 and 'Conclude with the score using the format: "Score: <total points>"' in prompt


@pytest.mark.parametrize("text, score", [
    ("Relevant and useful.\nScore: 4", 4.0),
    ("score: 3/5", 3.0),
    ("Score: 3 out of 5", 3.0),
    ("First tally Score: 2, then more points.\nScore: 5", 5.0),  # the last one counts
    ("Score: **4**", 4.0),
    ("Score: 4.5", 4.5),
    ("Score: 7", None),  # outside 0..5
    ("I would give it four points.", None),
    ("", None),
    ("Score:", None),
])
def test_score_parsing_including_malformed_judgments(text, score):
    assert parse_score(text) == score


def test_verdict_averages_parseable_judgments_and_counts_the_rest():
    v = verdict(["Score: 4", "garbage", "Score: 2"])
    assert v.score == 3.0 and v.unparseable == 1
    assert verdict(["nothing", "at all"]).score is None


def test_pairs_are_highest_versus_lowest_and_ties_are_dropped():
    assert preference_pair(["a", "b", "c", "d"], [2.0, 4.5, None, 1.0]) == ("b", "d")
    assert preference_pair(["a", "b"], [3.0, 3.0]) is None
    assert preference_pair(["a", "b"], [3.0, None]) is None


def test_eft_rationales_end_in_the_score_they_teach():
    assert parse_score(rationale(3)) == 3 and rationale(3).startswith("Criteria met: relevant, substantial, useful.")
    assert parse_score(rationale(0)) == 0


def test_self_instruction_cleaning_and_deduplication():
    import random

    prompt = few_shot_prompt(["Write a poem.", "Sum two numbers."], 2, random.Random(0))
    assert prompt.endswith("Task 3:") and "Task 1:" in prompt
    assert clean_task(" Explain how tides work.\nTask 5: more") == "Explain how tides work."
    assert clean_task("Explain the tides. Task 4: Write") == "Explain the tides."
    assert clean_task("ok") is None and clean_task("12 34 56") is None
    kept = deduplicate(["Write a short poem about the sea.", "Write a short poem about the sea!",
                        "List three prime numbers."], ["Write a poem."])
    assert kept == ["Write a short poem about the sea.", "List three prime numbers."]


def make_seed_dir(path):
    rows = []
    for i in range(8):
        for j, q in enumerate([0.2, 0.6, 1.0]):
            rows.append({"prompt_id": f"p{i}", "prompt_text": f"question {i}?", "response_id": f"r{i}{j}",
                         "response_text": f"answer {i} {'x' * j}", "language": "en", "quality_score": q})
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "oasst2_quality_scored.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (path / "self_instruct_seed.jsonl").write_text("".join(
        json.dumps({"instruction": t, "instances": []}) + "\n"
        for t in ["Write a poem about rain.", "Name three colours.", "Explain what a noun is.",
                  "Give a synonym for happy.", "Sort these numbers: 3 1 2."]))
    (path / "mt_bench_questions.jsonl").write_text("".join(
        json.dumps({"question_id": i, "turns": [f"Describe thing {i}.", "again"]}) + "\n" for i in range(3)))
    return path


def test_seed_data_splits_training_and_held_out_prompts(tmp_path):
    seeds = load_seed_data(make_seed_dir(tmp_path / "seed"), held_out=2, seed=0)
    assert len(seeds.held_out) == 2 and len(seeds.ift) == 6 and len(seeds.eft) == 18
    assert seeds.ift[0].source.startswith("oasst2_quality_scored.jsonl.gz:")
    held = {r.prompt for r in seeds.held_out}
    assert not any(p in e.prompt for e in seeds.ift for p in held)
    assert all(e.completion.endswith("xx") for e in seeds.ift)  # the best-scored response (quality 1.0)
    assert sorted(parse_score(e.completion) for e in seeds.eft[:3]) == [1, 3, 5]
    assert seeds.questions == ["Describe thing 0.", "Describe thing 1.", "Describe thing 2."]


def test_bad_seed_data_names_the_file_and_line(tmp_path):
    seed = make_seed_dir(tmp_path / "seed")
    with gzip.open(seed / "oasst2_quality_scored.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt_id": "a", "prompt_text": "q", "response_text": "r"}) + "\n")
    with pytest.raises(DataError, match=r"oasst2_quality_scored.jsonl.gz:1: missing field 'quality_score'"):
        load_seed_data(seed)
    (seed / "mt_bench_questions.jsonl").unlink()
    with pytest.raises(DataError, match="the seed data needs mt_bench_questions.jsonl"):
        load_seed_data(seed)


def test_loop_stops_on_unparseable_judgments_keeps_its_files_and_resumes(tiny_long_dir, tmp_path, monkeypatch):
    import train.dpo

    started = []  # the model each DPO stage starts from (and takes as its reference)
    real_dpo = train.dpo.train_dpo
    monkeypatch.setattr(train.dpo, "train_dpo", lambda data, opts, **kw: started.append(opts.model) or
                        real_dpo(data, opts, **kw))
    seed = make_seed_dir(tmp_path / "seed")
    options = TrainOptions(model=str(tiny_long_dir), out=str(tmp_path / "run"), max_steps=2, batch_size=4,
                           max_length=4096, progress=False, save_steps=1, eval_fraction=0.2)
    from conftest import save_tiny_text_model

    judge_dir = save_tiny_text_model(tmp_path / "judge", seed=9, max_length=4096)  # neither M0 nor any M_t
    config = SelfRewardConfig(iterations=2, prompts_per_iter=3, candidates=2, judgments=2, max_new_tokens=6,
                              judge_tokens=6, held_out=2, questions=2, judge=str(judge_dir))
    # A random tiny model never writes "Score: N": the loop stops with a clear message, files kept.
    with pytest.raises(JudgeFailed, match=r"none of the \d+ judgments had a parseable 'Score: N'"):
        self_reward(seed, options, config)
    stage = tmp_path / "run" / "m2"
    for name in ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl"):
        assert (stage / name).exists()
    assert (tmp_path / "run" / "m1" / "model").is_dir() and (tmp_path / "run" / "m1" / "eft.jsonl").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["iterations"]["1"]["judge"]["unparseable"] == metrics["iterations"]["1"]["judge"]["judgments"]
    prompts = (stage / "prompts.jsonl").read_text()
    assert len(prompts.splitlines()) >= 1

    # A better judge's verdicts (written in place of the stored ones): the rerun resumes from them.
    judged = [json.loads(line) for line in (stage / "judgments.jsonl").read_text().splitlines()]
    for k, row in enumerate(judged):
        row["scores"] = [float(k % 2 * 4), float(k % 2 * 4)]
        row["score"] = float(k % 2 * 4)
    (stage / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judged))
    result = self_reward(seed, options, config)
    assert (stage / "prompts.jsonl").read_text() == prompts  # not regenerated
    pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
    candidates = [json.loads(line) for line in (stage / "candidates.jsonl").read_text().splitlines()]
    assert len(pairs) == len(candidates)  # each prompt: candidate 2 (score 4) over candidate 1 (score 0)
    assert all(p["chosen"] == c["candidates"][1] and p["rejected"] == c["candidates"][0]
               for p, c in zip(pairs, candidates))
    assert (stage / "model").is_dir() and json.loads((stage / "metrics.json").read_text())["trainer"] == "dpo"
    assert started == [str(tmp_path / "run" / "m1" / "model")]  # M2 = DPO(M1), never DPO(M0)
    two = result["iterations"]["2"]
    assert two["aift"]["pairs"] == len(pairs) and two["head_to_head"]["against"] == "M1"
    h2h = two["head_to_head"]
    assert h2h["judge"] == str(judge_dir) and h2h["questions"] == 2
    # the win rate again, from the stored answers and the judge's expected scores computed here
    rows = [json.loads(line) for line in (stage / "head_to_head.jsonl").read_text().splitlines()]
    judge = load_potential(judge_dir)
    new, old = (judge.rewards([r["question"] for r in rows], [r[m] for r in rows]) for m in ("M2", "M1"))
    outcomes = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(new, old)]
    assert h2h["win_rate"] == pytest.approx(sum(outcomes) / 2)
    assert (h2h["wins"], h2h["losses"], h2h["ties"]) == (outcomes.count(1.0), outcomes.count(0.0), outcomes.count(0.5))
    assert h2h["ci95"][0] <= h2h["win_rate"] <= h2h["ci95"][1]
    assert result["generation"]["tokens"] > 0
    # the judge validated on the held-out human-rated responses first: its pairwise accuracy by hand
    rated = load_seed_data(seed, held_out=config.held_out, seed=options.seed, limit=config.seed_limit).held_out
    flat = judge.rewards([r.prompt for r in rated for _ in r.responses], [x for r in rated for x, _ in r.responses])
    outcomes, k = [], 0
    for r in rated:
        s, k = flat[k:k + len(r.responses)], k + len(r.responses)
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                if r.responses[i][1] != r.responses[j][1]:
                    agree = (s[i] - s[j]) * (r.responses[i][1] - r.responses[j][1])
                    outcomes.append(1.0 if agree > 0 else 0.0 if agree < 0 else 0.5)
    validation = result["head_to_head_judge"]
    assert validation["judge"] == str(judge_dir) and validation["human_pairs"] == len(outcomes) > 0
    assert validation["pairwise_accuracy"] == pytest.approx(np.mean(outcomes))
    assert f"(judge acc. {validation['pairwise_accuracy']:.3f})" in (tmp_path / "run" / "report.md").read_text()
    assert "| M2 |" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "report.png").exists()


def test_intervals_match_the_normal_approximation_and_degenerate_cases():
    from train.intervals import mean_ci95

    rng = np.random.default_rng(0)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=80).tolist()
    low, high = mean_ci95(outcomes, seed=1)
    mean, se = np.mean(outcomes), np.std(outcomes) / np.sqrt(80)
    assert low < mean < high
    assert abs(low - (mean - 1.96 * se)) < 0.03 and abs(high - (mean + 1.96 * se)) < 0.03
    assert mean_ci95([1.0] * 10) == [1.0, 1.0] and mean_ci95([1.0]) is None


# -- the judge as a steering potential --------------------------------------------------------------
def test_judge_potential_is_the_expected_score_of_the_judge_prompt(tiny_long_dir):
    import torch

    from steer.potentials import JudgeModel, load_potential
    from steer.template import format_prompt

    judge = load_potential(tiny_long_dir)
    assert isinstance(judge, JudgeModel)
    items = [("Name a colour.", "Blue."), ("Name a colour.", "I do not know, maybe a long answer.")]
    batched = judge.rewards(*zip(*items))
    for (instruction, response), value in zip(items, batched):
        ids = judge.tokenizer(format_prompt(judge_instruction(instruction, response)) + "Score: ")["input_ids"]
        with torch.no_grad():
            logits = judge.model(torch.tensor([ids])).logits[0, -1]
        digits = [judge.tokenizer(str(k), add_special_tokens=False)["input_ids"][0] for k in range(6)]
        p = torch.softmax(logits[digits].double(), -1)
        assert value == pytest.approx(float((p * torch.arange(6)).sum()), abs=1e-5)
        assert 0 <= value <= 5
    assert batched[0] != batched[1]


def test_steer_file_steers_with_a_judge_toward_lm_times_exp_score(tiny_lm, tiny_long_dir):
    import math

    import numpy as np
    from exact import complete_sequences

    from steer_lang.script import Script

    temperature, steps = 0.05, 2
    source = f"""
reward_model judge = "{tiny_long_dir}"
context c = ""
repeat {steps}:
    t = sample next(c)
    if t == eos:
        stop
score reward(judge, "say", text(c)) / {temperature}
"""
    script = Script.from_source(source, "judge.steer", allow_paths=[tiny_long_dir])
    judge = script.resources()["judge"]
    eos = next(iter(tiny_lm.vocab.eos_ids))
    target = {}
    for seq, logp in complete_sequences(tiny_lm, tiny_lm.encode(""), steps).items():
        text = tiny_lm.decode([t for t in seq if t != eos])
        target[text] = np.logaddexp(target.get(text, -np.inf), logp + judge.rewards(["say"], [text])[0] / temperature)
    log_z = np.logaddexp.reduce(list(target.values()))
    exact = {k: math.exp(v - log_z) for k, v in target.items()}
    post = script.run(tiny_lm, particles=2000, seed=0, method="is")
    estimate = post.distribution()
    assert 0.5 * sum(abs(estimate.get(k, 0.0) - p) for k, p in exact.items()) < 0.06
    assert post.log_ml == pytest.approx(log_z, abs=0.1)
