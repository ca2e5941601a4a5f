"""The self-rewarding loop with a checkable reward, on a tiny model: rewards, pairs and the paired
change in exact match are recomputed from the files the loop writes."""

import json

import numpy as np
import pytest

from train.checkable_reward import CheckableConfig, change, checkable_self_reward, reward
from train.common import TrainOptions
from train.intervals import mean_ci95
from train.judge import preference_pair


def test_reward_is_exact_then_contains_then_nothing():
    assert reward(" 1773.\nThe tea", "1773") == 2
    assert reward("In 1773 the", "1773") == 1
    assert reward("The Boston", "1773") == 0


def test_change_is_the_mean_paired_difference_with_its_interval():
    before, after = [0, 0, 1, 0, 1, 0], [1, 0, 1, 1, 1, 0]
    found = change(after, before)
    assert found["change"] == pytest.approx(2 / 6)
    assert found["ci95"] == mean_ci95([1, 0, 0, 1, 0, 0])


def _write(tmp_path, n=12):
    passages, questions = [], []
    for k in range(n):
        article = f"{k % 6}"  # two questions per article: the split keeps articles whole
        passages.append({"id": f"{article}-{k}", "text": f"Paragraph {k}: the answer is {k % 3}."})
        questions.append({"question": f"Which digit? Question {k}.", "answer": f"{k % 3}", "source": f"{article}-{k}"})
    qa, texts = tmp_path / "qa.jsonl", tmp_path / "passages.jsonl"
    qa.write_text("".join(json.dumps(q) + "\n" for q in questions))
    texts.write_text("".join(json.dumps(p) + "\n" for p in passages))
    return qa, texts


def test_loop_trains_on_reward_ranked_pairs_and_reports_the_paired_change(tiny_long_dir, tmp_path, monkeypatch):
    import train.dpo

    started = []
    real_dpo = train.dpo.train_dpo
    monkeypatch.setattr(train.dpo, "train_dpo", lambda data, opts, **kw: started.append(opts.model) or
                        real_dpo(data, opts, **kw))
    qa, texts = _write(tmp_path)
    options = TrainOptions(model=str(tiny_long_dir), out=str(tmp_path / "run"), max_steps=1, batch_size=2,
                           max_length=512, progress=False, save_steps=1, eval_fraction=0.2)
    config = CheckableConfig(iterations=2, train_questions=8, eval_questions=4, candidates=12, max_new_tokens=8)
    result = checkable_self_reward(qa, texts, options, config)
    run = tmp_path / "run"
    # M1 = DPO(M0), M2 = DPO(M1): each starts from (and is referenced to) the model before it
    assert started == [str(tiny_long_dir), str(run / "m1" / "model")]
    for t in (1, 2):
        stage = run / f"m{t}"
        rows = [json.loads(line) for line in (stage / "candidates.jsonl").read_text().splitlines()]
        pairs = [json.loads(line) for line in (stage / "pairs.jsonl").read_text().splitlines()]
        expected = [preference_pair(r["candidates"], [reward(c, r["answer"]) for c in r["candidates"]]) for r in rows]
        expected = [e for e in expected if e is not None]
        assert [(p["chosen"], p["rejected"]) for p in pairs] == expected and result["models"][str(t)]["pairs"] == len(pairs)
        answers = [r["answer"] for r in rows]
        for p in pairs:  # the chosen answer is rewarded more than the rejected one
            row = next(r for r in rows if r["prompt"] == p["prompt"])
            assert reward(p["chosen"], row["answer"]) > reward(p["rejected"], row["answer"])
        assert len(answers) == 8
    # exact match and its change from M0, recomputed from the stored held-out answers
    exact = {t: [float(reward(r["output"], r["answer"]) == 2) for r in map(json.loads,
                 (run / f"m{t}" / "answers.jsonl").read_text().splitlines())] for t in (0, 1, 2)}
    held = [json.loads(line)["question"] for line in (run / "m0" / "answers.jsonl").read_text().splitlines()]
    trained = {json.loads(line)["question"] for line in (run / "m1" / "candidates.jsonl").read_text().splitlines()}
    assert len(held) == 4 and not trained & set(held)
    two = result["models"]["2"]
    assert two["exact_match"] == pytest.approx(np.mean(exact[2]))
    assert two["vs_m0"]["change"] == pytest.approx(np.mean(exact[2]) - np.mean(exact[0]))
    assert "| M2 |" in (run / "report.md").read_text()
    # a rerun resumes: nothing is sampled or trained again
    started.clear()
    assert checkable_self_reward(qa, texts, options, config)["models"] == result["models"] and started == []
    # stopped after M2 was trained, before it was evaluated: the rerun evaluates it and still counts its pairs
    saved = json.loads((run / "metrics.json").read_text())
    del saved["models"]["2"]
    (run / "metrics.json").write_text(json.dumps(saved))
    again = checkable_self_reward(qa, texts, options, config)["models"]["2"]
    assert started == [] and again["pairs"] == two["pairs"] and again["exact_match"] == two["exact_match"]


def test_questions_from_one_article_cannot_be_held_out_and_say_so(tmp_path):
    from steer.errors import SteerError

    qa, texts = _write(tmp_path, n=1)
    options = TrainOptions(model=None, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(SteerError, match="at least two articles"):
        checkable_self_reward(qa, texts, options, CheckableConfig())
