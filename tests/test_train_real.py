"""Every trainer on the real default model (LoRA, a step or two, short sequences), from the vendored data."""

import json
import math
from pathlib import Path

import pytest

import steer
from train.common import TrainOptions

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def options(out, **kw):
    base = dict(out=str(out), max_steps=2, batch_size=2, max_length=96, lora=True, lora_r=4, limit=8,
                eval_fraction=0.25, save_steps=1, progress=False, learning_rate=1e-4)
    return TrainOptions(**{**base, **kw})


def test_the_training_tokenizer_drops_only_what_its_constructor_read(tmp_path):
    """Without its Python copies of the vocabulary and merges, the tokenizer splits, lists its vocabulary
    and saves exactly as the one transformers loads."""
    from datasets.fingerprint import Hasher
    from transformers import AutoTokenizer

    from steer.lm import default_model_path
    from train.common import load_tokenizer

    light, full = load_tokenizer(default_model_path()), AutoTokenizer.from_pretrained(default_model_path())
    text = "Hello wörld,  the quick\n\nbrown 123 fox <eos>"
    assert light(text)["input_ids"] == full(text)["input_ids"] and light.get_vocab() == full.get_vocab()
    assert not light.__dict__["_vocab"] and full.__dict__["_vocab"]
    light.save_pretrained(tmp_path / "light")
    full.save_pretrained(tmp_path / "full")
    assert (tmp_path / "light" / "tokenizer.json").read_bytes() == (tmp_path / "full" / "tokenizer.json").read_bytes()
    assert Hasher.hash(light) == Hasher.hash(load_tokenizer(default_model_path()))  # fingerprints stay stable


def test_dpo_with_lora_on_gemma(tmp_path):
    from train.dpo import train_dpo

    metrics = train_dpo(DATA / "hh_rlhf_harmless.jsonl.gz", options(tmp_path / "dpo"))
    assert metrics["train"]["steps"] == 2 and math.isfinite(metrics["train"]["loss"])
    assert metrics["eval"]["eval_rewards/margins"] != 0.0
    assert (tmp_path / "dpo" / "checkpoint-2").is_dir() and (tmp_path / "dpo" / "adapter").is_dir()
    lm = steer.load_model(tmp_path / "dpo" / "model")  # the merged model steers like any other
    post = steer.smc(steer.Generate(lm, "The weather today is", max_tokens=3), particles=2, seed=0)
    assert all(len(p.context.generated) >= 1 for p in post.particles)


def test_online_dpo_with_lora_on_gemma(tmp_path):
    from steer.template import format_prompt
    from train.online_dpo import train_online_dpo

    drawn = []

    def positive(prompts: list[str], responses: list[str]) -> list[float]:
        drawn.extend(responses)
        return [float(sum(w in r.lower() for w in ("good", "great", "nice"))) for r in responses]

    prompts = [format_prompt("Write a short review of a bakery."), format_prompt("Describe a sunny day.")]
    metrics = train_online_dpo(prompts, positive, options(tmp_path / "online", max_steps=1, save_steps=10),
                               beta=1.0, max_new_tokens=6)
    # the policy starts as its reference (the adapter off), so the first DPO loss is ln 2 exactly
    assert metrics["log"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert len(drawn) == 4 and any(d.strip() for d in drawn)  # two responses to each prompt, decoded text
    assert (tmp_path / "online" / "model" / "model.safetensors").is_file() and (tmp_path / "online" / "adapter").is_dir()


def test_sft_with_lora_on_gemma(tmp_path):
    from train.sft import train_sft

    metrics = train_sft(DATA / "self_instruct_seed.jsonl", options(tmp_path / "sft"))
    assert metrics["examples"]["train"] == 6 and metrics["train"]["steps"] == 2
    assert math.isfinite(metrics["eval"]["eval_loss"]) and metrics["eval"]["eval_loss"] != metrics["eval_before"]["eval_loss"]
    # a trainer that learns: the loss on one batch, trained on again and again, goes down
    same_batch = train_sft(DATA / "self_instruct_seed.jsonl",
                           options(tmp_path / "sft-one-batch", limit=2, eval_fraction=0.0, max_steps=4,
                                   learning_rate=1e-3, save_steps=1000))
    losses = [row["loss"] for row in same_batch["log"] if "loss" in row]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["trainer"] == "sft"


def test_reward_model_and_strength_on_gemma(tmp_path, gemma_reward_dir):
    from steer.potentials import RewardModel
    from train.strength import preference_strength

    path, metrics = gemma_reward_dir
    held_out = metrics["pairs"]["eval"]
    assert metrics["train"]["steps"] == 2 and held_out >= 2  # accuracy above chance: test_train_reward
    assert abs(metrics["eval"]["eval_accuracy"] * held_out - round(metrics["eval"]["eval_accuracy"] * held_out)) < 1e-6
    judge = RewardModel(path)
    assert len(set(judge.rewards(["Say hi"] * 2, ["Hello!", "Go away."]))) == 2
    strength = preference_strength(DATA / "hh_rlhf_harmless.jsonl.gz",
                                   options(tmp_path / "strength", max_steps=1, limit=12, max_length=256,
                                           save_steps=1000),
                                   models=2)
    assert strength["pairs"] >= 4 and sum(strength["categories"].values()) == strength["pairs"]
    assert (tmp_path / "strength" / "strength.png").exists()


def test_the_default_model_as_its_own_judge():
    from steer.lm import default_model_path
    from steer.potentials import JudgeModel

    judge = JudgeModel(default_model_path())
    instructions = ["What is the capital of France?"] * 2
    responses = ["The capital of France is Paris.", "Bananas are yellow."]
    batched = judge.rewards(instructions, responses)
    alone = [JudgeModel(default_model_path(), batch_size=1).rewards([i], [r])[0]
             for i, r in zip(instructions, responses)]
    assert all(0 <= s <= 5 for s in batched) and batched[0] != batched[1]
    assert batched == pytest.approx(alone, abs=1e-3)  # left padding does not change a score


def test_checkable_loop_on_gemma(tmp_path):
    """One iteration on the default model: M0 answers after the paragraph, its sampled answers are
    ranked by the exact-match reward into pairs, and M1 = DPO(M0) is scored on held-out articles."""
    from train.checkable_reward import CheckableConfig, checkable_self_reward, reward

    config = CheckableConfig(iterations=1, train_questions=6, eval_questions=4, candidates=4)
    result = checkable_self_reward(DATA / "wikipedia_cloze_qa.jsonl", DATA / "wikipedia_passages.jsonl.gz",
                                   options(tmp_path / "loop", max_steps=1, max_length=384, limit=None,
                                           eval_fraction=0.0), config)
    rows = [json.loads(line) for line in (tmp_path / "loop" / "m1" / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["candidates"]) == 4 for r in rows)
    # the base model answers in this form: some sampled answer is exactly the year
    assert any(reward(c, r["answer"]) == 2 for r in rows for c in r["candidates"])
    one = result["models"]["1"]
    assert one["pairs"] >= 1 and one["questions"] == 4
    assert one["vs_m0"]["change"] == pytest.approx(one["exact_match"] - result["models"]["0"]["exact_match"])
